//! Compiles the Dropline contracts with a vendored protoc, so no system protoc is needed.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let well_known = protoc_bin_vendored::include_path()?;
    // Build scripts are single threaded, and prost-build reads PROTOC from the environment.
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var("PROTOC", protoc)
    };
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [
        "dropline/common/v1/common.proto",
        "dropline/checkout/v1/checkout.proto",
        "dropline/operator/v1/operator.proto",
        "dropline/registry/v1/registry.proto",
        "dropline/dispatch/v1/dispatch.proto",
        "dropline/settlement/v1/settlement.proto",
        "dropline/edge/v1/edge.proto",
        "dropline/bench/v1/echo.proto",
    ];
    tonic_prost_build::configure()
        // Undecodable requests are INVALID_ARGUMENT, not INTERNAL (see src/codec.rs).
        .codec_path("crate::codec::StrictProstCodec")
        .file_descriptor_set_path(out_dir.join("dropline_descriptor.bin"))
        .compile_protos(&protos, &[".", well_known.to_str().ok_or("non-utf8 include path")?])?;
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
