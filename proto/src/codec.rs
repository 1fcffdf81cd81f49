//! The codec of every Dropline service and client: prost's, except that a request whose
//! bytes do not decode is the caller's mistake, INVALID_ARGUMENT, where `tonic_prost`
//! answers INTERNAL (which tells a client the server broke and invites a retry).
//!
//! `build.rs` names it as the generated code's `codec_path`, so servers and clients both
//! use it: a *response* that does not decode (a server bug) also reads INVALID_ARGUMENT on
//! the client. grpc.health.v1 and reflection come with tonic's own codec and keep INTERNAL.

use std::marker::PhantomData;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Status;

/// `tonic_prost::ProstCodec` with undecodable messages refused as INVALID_ARGUMENT.
#[derive(Debug, Clone)]
pub struct StrictProstCodec<T, U>(tonic_prost::ProstCodec<T, U>);

impl<T, U> Default for StrictProstCodec<T, U> {
    fn default() -> Self {
        StrictProstCodec(tonic_prost::ProstCodec::default())
    }
}

impl<T, U> Codec for StrictProstCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = SmallBufferEncoder<T>;
    type Decoder = StrictProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        SmallBufferEncoder(self.0.encoder())
    }

    fn decoder(&mut self) -> Self::Decoder {
        StrictProstDecoder(PhantomData)
    }
}

/// The buffer tonic allocates per call to encode a response (or request) into, and to
/// decode one from: tonic's default is 8 KiB each, so a unary call of a few hundred bytes
/// took 16 KiB from the allocator, at 100,000 calls/s enough churn that the kernel's zeroing
/// of fresh pages was a tenth of the server's CPU (`perf`, hot-SKU burst). Bigger messages
/// grow the buffer as they need; the yield threshold (when a stream flushes) is tonic's.
const CALL_BUFFER_BYTES: usize = 1024;
const YIELD_THRESHOLD_BYTES: usize = 32 * 1024;

fn buffer_settings() -> BufferSettings {
    BufferSettings::new(CALL_BUFFER_BYTES, YIELD_THRESHOLD_BYTES)
}

/// prost's encoder with [`CALL_BUFFER_BYTES`].
#[derive(Debug, Clone)]
pub struct SmallBufferEncoder<T>(tonic_prost::ProstEncoder<T>);

impl<T: prost::Message> Encoder for SmallBufferEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        self.0.encode(item, buf)
    }

    fn buffer_settings(&self) -> BufferSettings {
        buffer_settings()
    }
}

/// Decodes one message; a malformed one is INVALID_ARGUMENT with prost's reason.
#[derive(Debug, Clone)]
pub struct StrictProstDecoder<U>(PhantomData<U>);

impl<U: prost::Message + Default> Decoder for StrictProstDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf)
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("the message does not decode: {e}")))
    }

    fn buffer_settings(&self) -> BufferSettings {
        buffer_settings()
    }
}
