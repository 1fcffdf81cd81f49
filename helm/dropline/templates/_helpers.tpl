{{/* The chart's name, at most 63 characters. */}}
{{- define "dropline.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name: the release name, with "-dropline" unless it already says so. */}}
{{- define "dropline.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "dropline.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dropline.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: node
{{- end }}

{{- define "dropline.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "dropline.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: dropline
{{- end }}

{{- define "dropline.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s:%s@%s" .Values.image.repository $tag .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{- define "dropline.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "dropline.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "dropline.operatorSecret" -}}
{{- default (printf "%s-operator" (include "dropline.fullname" .)) .Values.operatorToken.existingSecret }}
{{- end }}

{{/* The name of the server certificate that the probes and `helm test` check. */}}
{{- define "dropline.tlsServerName" -}}
{{- default (printf "%s.%s.svc" (include "dropline.fullname" .) .Release.Namespace) .Values.tls.serverName }}
{{- end }}

{{/* `dropline health` against the server at `server`, over TLS, asking `service` (a list, for
an exec probe or a container's args). */}}
{{- define "dropline.tlsHealthArgs" -}}
- health
- --server
- {{ .server }}
{{- if .root.Values.tls.caKey }}
- --tls-ca
- /etc/dropline-tls/{{ .root.Values.tls.caKey }}
{{- end }}
- --tls-server-name
- {{ include "dropline.tlsServerName" .root }}
- --service
- {{ .service | quote }}
- --timeout-ms
- {{ .timeoutMs | quote }}
{{- end }}

{{/* The bundled NATS chart's full name, computed as that chart does. */}}
{{- define "dropline.natsFullname" -}}
{{- $nats := .Values.nats | default dict }}
{{- if $nats.fullnameOverride }}
{{- $nats.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default "nats" $nats.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Every NATS server by its stable name (bundled), or the external URLs; comma-separated. */}}
{{- define "dropline.natsUrls" -}}
{{- if .Values.nats.enabled }}
{{- $full := include "dropline.natsFullname" . }}
{{- $urls := list }}
{{- range $i := until (int .Values.nats.config.cluster.replicas) }}
{{- $urls = append $urls (printf "nats://%s-%d.%s-headless:4222" $full $i $full) }}
{{- end }}
{{- join "," $urls }}
{{- else }}
{{- join "," .Values.externalNats.urls }}
{{- end }}
{{- end }}

{{/* Settings no JSON schema can express: fail early with a clear message. */}}
{{- define "dropline.validate" -}}
{{- if and .Values.nats.enabled .Values.externalNats.urls }}
{{- fail "set either nats.enabled (the bundled NATS chart) or externalNats.urls, not both" }}
{{- end }}
{{- if and (not .Values.nats.enabled) (not .Values.externalNats.urls) }}
{{- fail "nats.enabled is false: set externalNats.urls to your NATS servers" }}
{{- end }}
{{- if lt (int .Values.cluster.leaseTtlMs) (mul 3 (int .Values.cluster.leaseRenewMs)) }}
{{- fail "cluster.leaseTtlMs must be at least 3 × cluster.leaseRenewMs" }}
{{- end }}
{{- if and .Values.nats.enabled (gt (int .Values.cluster.journalReplicas) (int .Values.nats.config.cluster.replicas)) }}
{{- fail "cluster.journalReplicas cannot exceed the NATS servers (nats.config.cluster.replicas)" }}
{{- end }}
{{- if and .Values.tls.enabled (not .Values.tls.secretName) }}
{{- fail "tls.enabled needs tls.secretName: a Secret with tls.crt and tls.key" }}
{{- end }}
{{- if and .Values.tls.clientCaSecretName (not .Values.tls.enabled) }}
{{- fail "tls.clientCaSecretName needs tls.enabled" }}
{{- end }}
{{- $needed := add (div (int .Values.shutdownDelayMs) 1000) 10 (div (int .Values.cluster.leaseTtlMs) 1000) }}
{{- if lt (int .Values.terminationGracePeriodSeconds) (int $needed) }}
{{- fail (printf "terminationGracePeriodSeconds must be at least %d (shutdown delay + 10 s drain + lease TTL)" (int $needed)) }}
{{- end }}
{{- end }}
