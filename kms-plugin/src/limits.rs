//! The size bound on a request message, and the status an oversized one gets.
//!
//! The largest legitimate request is a Decrypt: a ciphertext of at most 1 KiB, a key_id of at
//! most 1 KiB and annotations of at most 32 KiB. The transport accepts messages up to
//! [`MAX_REQUEST_MESSAGE`], far above that, so the plugin's own checks see every request of a
//! plausible size and answer `INVALID_ARGUMENT` with what is wrong. A larger message is
//! refused by the transport before it is buffered; the transport says `OUT_OF_RANGE`, which
//! [`OversizedAsInvalidArgument`] turns into the same `INVALID_ARGUMENT` the plugin's own
//! checks give, so a client sees one code for "request too large", whatever its size.

use http::Response;
use tonic::body::Body;

/// Largest request message the transport decodes (1 MiB): the bound on what one request can
/// make the plugin buffer.
pub const MAX_REQUEST_MESSAGE: usize = 1024 * 1024;
// Ciphertext + key_id + annotations at the apiserver's own bounds must fit.
const _: () = assert!(MAX_REQUEST_MESSAGE > 1024 + 1024 + 32 * 1024);

/// What an oversized request message tells the client.
pub const MESSAGE_TOO_LARGE: &str =
    "request message exceeds the KMS plugin's 1 MiB limit (Encrypt plaintext: at most 995 bytes; Decrypt ciphertext: at most 1024 bytes)";

/// A layer that answers `INVALID_ARGUMENT` instead of the transport's `OUT_OF_RANGE`.
///
/// The KMS service itself never answers `OUT_OF_RANGE` (see `KmsError::code`), so every
/// `OUT_OF_RANGE` in a response head comes from the transport's message-size check.
pub type OversizedAsInvalidArgument =
    tower::util::MapResponseLayer<fn(Response<Body>) -> Response<Body>>;

/// The layer, for `tonic::transport::Server::builder().layer(..)`.
pub fn oversized_as_invalid_argument() -> OversizedAsInvalidArgument {
    tower::util::MapResponseLayer::new(map_oversized as fn(Response<Body>) -> Response<Body>)
}

/// Rewrites a trailers-only `OUT_OF_RANGE` response (how tonic refuses a message over its
/// decoding limit) into `INVALID_ARGUMENT`; any other response passes unchanged.
pub fn map_oversized(resp: Response<Body>) -> Response<Body> {
    let out_of_range = resp
        .headers()
        .get(tonic::Status::GRPC_STATUS)
        .is_some_and(|v| tonic::Code::from_bytes(v.as_bytes()) == tonic::Code::OutOfRange);
    if out_of_range {
        tracing::debug!("refused a request message over the size limit");
        tonic::Status::invalid_argument(MESSAGE_TOO_LARGE).into_http()
    } else {
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(r: &Response<Body>) -> Option<tonic::Code> {
        tonic::Status::from_header_map(r.headers()).map(|s| s.code())
    }

    #[test]
    fn out_of_range_becomes_invalid_argument_and_nothing_else_changes() {
        let r = map_oversized(
            tonic::Status::out_of_range("Error, decoded message length too large").into_http(),
        );
        assert_eq!(code(&r), Some(tonic::Code::InvalidArgument));
        let s = tonic::Status::from_header_map(r.headers()).unwrap();
        assert_eq!(s.message(), MESSAGE_TOO_LARGE);

        for c in [tonic::Code::NotFound, tonic::Code::Unavailable] {
            let r = map_oversized(tonic::Status::new(c, "x").into_http());
            assert_eq!(code(&r), Some(c));
        }
        let ok = map_oversized(Response::new(Body::empty()));
        assert_eq!(code(&ok), None);
    }
}
