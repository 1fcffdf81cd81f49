//! CheckoutService.ReserveStream: many buyers' reserves per message over one stream, for a
//! storefront backend forwarding a burst. Each request is answered exactly as Reserve
//! would answer it (`checkout::reserve_command` checks it the same way); a message's
//! reserves for one SKU go to its actor as one batch (`ask_many`), decided into one
//! journal write, so a burst pays neither HTTP/2 nor the actor's mailbox and the journal's
//! queue per buyer.
//!
//! Everything is bounded (`crate::limits`, `RESERVE_STREAM*`): reserves per message,
//! messages decided at once and answers queued per stream (the server reads no further
//! message while they are full, so HTTP/2 flow control holds a fast or non-reading client
//! back), streams per connection and per server, bytes per message, and how long an answer
//! may wait for a client that does not read.

use crate::auth::credential_hash;
use crate::checkout::reserve_command;
use crate::convert;
use crate::limits::{
    RESERVE_STREAMS_MAX, RESERVE_STREAMS_PER_CONNECTION_MAX, RESERVE_STREAM_MESSAGES_IN_FLIGHT_MAX,
    RESERVE_STREAM_REPLIES_QUEUED_MAX, RESERVE_STREAM_REPLY_STALL_MS, RESERVE_STREAM_REQUESTS_MAX,
};
use crate::platform::Platform;
use crate::status::{from_command_error, invalid_argument};
use actors::fulfilment::Principal;
use domain::registry::StorefrontRecord;
use domain::sku::{Reservation, SkuCommand, SkuState};
use domain::{DropId, FieldViolation, SkuId, StorefrontId};
use futures::stream::FuturesOrdered;
use futures::StreamExt;
use proto::checkout::v1::{reserve_result, RequestStatus, ReserveResult, ReserveStreamRequest, ReserveStreamResponse};
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::Stream;
use tonic::{Request, Status, Streaming};
use tracing::debug;

/// The open ReserveStreams of a server, by client connection (its peer address; `None`
/// where the transport has none).
#[derive(Default)]
pub struct ReserveStreams {
    open: Arc<Mutex<OpenStreams>>,
}

#[derive(Default)]
struct OpenStreams {
    total: usize,
    by_connection: HashMap<Option<SocketAddr>, usize>,
}

/// One open stream's place in [`ReserveStreams`], given back when dropped.
struct Slot {
    open: Arc<Mutex<OpenStreams>>,
    connection: Option<SocketAddr>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.open.lock().expect("reserve streams lock");
        open.total -= 1;
        if let Some(count) = open.by_connection.get_mut(&self.connection) {
            *count -= 1;
            if *count == 0 {
                open.by_connection.remove(&self.connection);
            }
        }
    }
}

impl ReserveStreams {
    fn slot(&self, connection: Option<SocketAddr>) -> Result<Slot, Status> {
        let mut open = self.open.lock().expect("reserve streams lock");
        if open.total >= RESERVE_STREAMS_MAX {
            return Err(Status::resource_exhausted(format!(
                "this server has {RESERVE_STREAMS_MAX} ReserveStreams open; nothing was changed: \
                 use an open stream, or retry shortly"
            )));
        }
        let on_connection = open.by_connection.entry(connection).or_default();
        if *on_connection >= RESERVE_STREAMS_PER_CONNECTION_MAX {
            return Err(Status::resource_exhausted(format!(
                "this connection has {RESERVE_STREAMS_PER_CONNECTION_MAX} ReserveStreams open; \
                 nothing was changed: send more per stream, or open another connection"
            )));
        }
        *on_connection += 1;
        open.total += 1;
        Ok(Slot {
            open: self.open.clone(),
            connection,
        })
    }

    /// Starts answering the stream of `request` for `storefront` (its credential already
    /// checked), or refuses it when the streams are at their bounds.
    pub fn open(
        &self,
        platform: &Platform,
        storefront: &StorefrontRecord,
        request: Request<Streaming<ReserveStreamRequest>>,
    ) -> Result<Replies, Status> {
        let slot = self.slot(request.remote_addr())?;
        let credential = credential_hash(&request)
            .ok_or_else(|| Status::unauthenticated("this call needs a storefront credential"))?;
        let (tx, rx) = mpsc::channel(RESERVE_STREAM_REPLIES_QUEUED_MAX);
        let (abort_tx, abort_rx) = oneshot::channel();
        let stream = Answering {
            platform: platform.clone(),
            storefront: storefront.storefront_id.clone(),
            credential,
        };
        tokio::spawn(stream.run(request.into_inner(), tx, abort_tx));
        Ok(Replies {
            replies: rx,
            abort: Some(abort_rx),
            ended: false,
            _slot: slot,
        })
    }
}

/// The answers of one ReserveStream, as tonic sends them.
pub struct Replies {
    replies: mpsc::Receiver<Result<ReserveStreamResponse, Status>>,
    /// Ends the stream at once with this status, answers still queued or not (a client that
    /// stopped reading).
    abort: Option<oneshot::Receiver<Status>>,
    ended: bool,
    /// Held until tonic drops the stream.
    _slot: Slot,
}

impl Stream for Replies {
    type Item = Result<ReserveStreamResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.ended {
            return Poll::Ready(None);
        }
        if let Some(abort) = self.abort.as_mut() {
            match Pin::new(abort).poll(cx) {
                Poll::Ready(Ok(status)) => {
                    self.ended = true;
                    return Poll::Ready(Some(Err(status)));
                }
                Poll::Ready(Err(_)) => self.abort = None,
                Poll::Pending => {}
            }
        }
        match self.replies.poll_recv(cx) {
            Poll::Ready(Some(reply)) => {
                self.ended = reply.is_err();
                Poll::Ready(Some(reply))
            }
            other => other,
        }
    }
}

/// What answers one stream's messages.
struct Answering {
    platform: Platform,
    storefront: StorefrontId,
    /// The hash of the credential the stream was opened with, looked up again per message.
    credential: blake3::Hash,
}

impl Answering {
    /// Reads messages while fewer than `RESERVE_STREAM_MESSAGES_IN_FLIGHT_MAX` are being
    /// answered, and hands their answers on in order; at the end of the client's stream, an
    /// error on it, a refused credential or the server's shutdown, it stops reading,
    /// answers what it read and ends the stream (with that status, but for a plain end).
    async fn run(
        self,
        mut inbound: Streaming<ReserveStreamRequest>,
        replies: mpsc::Sender<Result<ReserveStreamResponse, Status>>,
        abort: oneshot::Sender<Status>,
    ) {
        let this = Arc::new(self);
        let mut shutdown = this.platform.shutdown.clone();
        let mut answering = FuturesOrdered::new();
        let mut reading = true;
        let mut end: Option<Status> = None;
        let stall = Duration::from_millis(RESERVE_STREAM_REPLY_STALL_MS);
        while reading || !answering.is_empty() {
            let room = answering.len() < RESERVE_STREAM_MESSAGES_IN_FLIGHT_MAX;
            tokio::select! {
                // Answers first: a full pipeline drains before more is read.
                biased;
                Some(reply) = answering.next(), if !answering.is_empty() => {
                    match tokio::time::timeout(stall, replies.send(Ok(reply))).await {
                        Ok(Ok(())) => {}
                        // The client went away: what was read is still answered (durably),
                        // to nobody.
                        Ok(Err(_)) => reading = false,
                        Err(_) => {
                            debug!(storefront = %this.storefront, "reserve stream not read for {RESERVE_STREAM_REPLY_STALL_MS} ms; ending it");
                            let _ = abort.send(Status::deadline_exceeded(format!(
                                "an answer waited {RESERVE_STREAM_REPLY_STALL_MS} ms for this stream to be read; \
                                 the reserves answered stay done: retry with the same idempotency keys to get their results"
                            )));
                            return;
                        }
                    }
                }
                changed = shutdown.changed(), if reading => {
                    if changed.is_err() || *shutdown.borrow() {
                        reading = false;
                        end = Some(Status::unavailable("server shutting down; the messages read were answered, reconnect for the rest"));
                    }
                }
                message = inbound.message(), if reading && room => match message {
                    Ok(Some(message)) => match this.credential_holds() {
                        Ok(()) => {
                            let this = this.clone();
                            answering.push_back(async move { this.answer(message).await });
                        }
                        Err(status) => {
                            reading = false;
                            end = Some(status);
                        }
                    },
                    Ok(None) => reading = false,
                    // Undecodable or oversized: refused by the codec, so nothing of it was done.
                    Err(status) => {
                        reading = false;
                        end = Some(status);
                    }
                },
            }
        }
        if let Some(status) = end {
            let _ = tokio::time::timeout(stall, replies.send(Err(status))).await;
        }
    }

    /// Whether the stream's credential is still its storefront's (not replaced or removed).
    fn credential_holds(&self) -> Result<(), Status> {
        match self
            .platform
            .projections
            .directory
            .by_credential(self.credential.as_bytes())
        {
            Some(Principal::Storefront(record)) if record.storefront_id == self.storefront => Ok(()),
            _ => Err(Status::unauthenticated(
                "this stream's storefront credential is no longer valid; nothing in this message was done",
            )),
        }
    }

    /// The answer to one message: a result per reserve, in order, or the message refused
    /// whole.
    async fn answer(&self, message: ReserveStreamRequest) -> ReserveStreamResponse {
        let count = message.reserves.len();
        if count == 0 || count > RESERVE_STREAM_REQUESTS_MAX {
            let refusal = invalid_argument(vec![FieldViolation::new(
                "reserves",
                format!(
                    "a message holds 1 to {RESERVE_STREAM_REQUESTS_MAX} reserves, this one {count}; nothing in it was done"
                ),
            )]);
            return ReserveStreamResponse {
                results: Vec::new(),
                status: Some(request_status(&refusal)),
            };
        }
        let platform = &self.platform;
        // The storefront's call rate: the first reserves that fit it, as that many Reserve
        // calls in a row would.
        let (allowed, over_rate) = platform
            .throttle
            .storefront_calls(self.storefront.as_str(), count as u32);
        let mut results: Vec<Option<reserve_result::Result>> = Vec::with_capacity(count);
        // One batch per SKU, its reserves in the message's order.
        let mut batches: Vec<SkuBatch> = Vec::new();
        let mut batch_of: HashMap<(DropId, SkuId), usize> = HashMap::new();
        for (index, reserve) in message.reserves.into_iter().enumerate() {
            if index as u32 >= allowed {
                let refusal = over_rate.as_ref().expect("a refusal for the calls not allowed");
                platform.metrics.reserve(None);
                results.push(Some(error(refusal)));
                continue;
            }
            match reserve_command(platform, &self.storefront, reserve) {
                Ok((key, command)) => {
                    let batch = *batch_of.entry(key.clone()).or_insert_with(|| {
                        batches.push(SkuBatch {
                            key,
                            indexes: Vec::new(),
                            commands: Vec::new(),
                        });
                        batches.len() - 1
                    });
                    batches[batch].indexes.push(index);
                    batches[batch].commands.push(SkuCommand::Reserve(command));
                    results.push(None);
                }
                Err(status) => {
                    platform.metrics.reserve(None);
                    results.push(Some(error(&status)));
                }
            }
        }
        let bus = &platform.bus;
        let asks = batches.into_iter().map(|batch| async move {
            let replies = bus
                .ask_many_for::<SkuState, Reservation>(batch.key, batch.commands)
                .await;
            (batch.indexes, replies)
        });
        for (indexes, replies) in futures::future::join_all(asks).await {
            for (index, reply) in indexes.into_iter().zip(replies) {
                platform.metrics.reserve(reply.as_ref().ok().map(|r| r.outcome));
                results[index] = Some(match reply {
                    Ok(reservation) => reserve_result::Result::Reservation(convert::reservation(&reservation, |id| {
                        platform.keys.order_token(id)
                    })),
                    Err(e) => error(&from_command_error(e)),
                });
            }
        }
        ReserveStreamResponse {
            results: results
                .into_iter()
                .map(|result| ReserveResult {
                    result: Some(result.expect("every reserve answered")),
                })
                .collect(),
            status: None,
        }
    }
}

/// A message's reserves for one SKU: where each stands in the message, and its command.
struct SkuBatch {
    key: (DropId, SkuId),
    indexes: Vec<usize>,
    commands: Vec<SkuCommand>,
}

fn request_status(status: &Status) -> RequestStatus {
    RequestStatus {
        code: status.code() as i32,
        message: status.message().to_owned(),
        details: status.details().to_vec(),
    }
}

fn error(status: &Status) -> reserve_result::Result {
    reserve_result::Result::Error(request_status(status))
}
