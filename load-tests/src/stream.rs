//! A ReserveStream client for the load tests: one stream per connection, carrying the
//! messages of many workers, each answered in the order it was sent (the RPC's contract),
//! so a worker's message is matched to its answer by a queue, not by an id.

use std::collections::VecDeque;

use anyhow::Context as _;
use bytes::Bytes;
use proto::checkout::v1::{reserve_result, RequestStatus, ReserveOutcome, ReserveStreamRequest, ReserveStreamResponse};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};

use crate::Checkout;

/// Messages a client may have sent and not yet had answered; more is refused at once. The
/// load tests keep far fewer in flight, so sending never waits behind an unread answer.
const MESSAGES_QUEUED_MAX: usize = 256;

type Answer = oneshot::Sender<Result<ReserveStreamResponse, Status>>;

/// One open ReserveStream shared by many workers.
#[derive(Clone)]
pub struct ReserveStreamClient {
    submit: mpsc::Sender<(ReserveStreamRequest, Answer)>,
}

impl ReserveStreamClient {
    /// Opens a stream as the storefront of `checkout`.
    pub async fn open(mut checkout: Checkout) -> anyhow::Result<ReserveStreamClient> {
        let (requests, requests_rx) = mpsc::channel(MESSAGES_QUEUED_MAX);
        let mut answers = checkout
            .reserve_stream(ReceiverStream::new(requests_rx))
            .await
            .context("ReserveStream refused to open")?
            .into_inner();
        let (submit, mut submissions) = mpsc::channel::<(ReserveStreamRequest, Answer)>(MESSAGES_QUEUED_MAX);
        tokio::spawn(async move {
            let mut waiting: VecDeque<Answer> = VecDeque::new();
            let ended = loop {
                tokio::select! {
                    submission = submissions.recv() => match submission {
                        Some((message, answer)) => match requests.try_send(message) {
                            Ok(()) => waiting.push_back(answer),
                            Err(_) => {
                                let _ = answer.send(Err(Status::resource_exhausted("too many messages queued on this stream")));
                            }
                        },
                        None => break Status::cancelled("the client closed the stream"),
                    },
                    answer = answers.message(), if !waiting.is_empty() => match answer {
                        Ok(Some(answer)) => {
                            if let Some(waiter) = waiting.pop_front() {
                                let _ = waiter.send(Ok(answer));
                            }
                        }
                        Ok(None) => break Status::unavailable("the server ended the stream"),
                        Err(status) => break status,
                    },
                }
            };
            for waiter in waiting {
                let _ = waiter.send(Err(ended.clone()));
            }
        });
        Ok(ReserveStreamClient { submit })
    }

    /// Sends one message and waits for its answer.
    pub async fn call(&self, message: ReserveStreamRequest) -> Result<ReserveStreamResponse, Status> {
        let (answer, answered) = oneshot::channel();
        self.submit
            .send((message, answer))
            .await
            .map_err(|_| Status::unavailable("the stream has ended"))?;
        answered
            .await
            .map_err(|_| Status::unavailable("the stream ended before answering"))?
    }
}

/// Each reserve's outcome in an answer (or the whole message's refusal for each).
pub fn outcomes(answer: ReserveStreamResponse, count: usize) -> Vec<Result<ReserveOutcome, Status>> {
    if let Some(refused) = answer.status {
        let status = status_of(refused);
        return (0..count).map(|_| Err(status.clone())).collect();
    }
    answer
        .results
        .into_iter()
        .map(|result| match result.result {
            Some(reserve_result::Result::Reservation(reservation)) => Ok(reservation.outcome()),
            Some(reserve_result::Result::Error(error)) => Err(status_of(error)),
            None => Err(Status::internal("a result with nothing in it")),
        })
        .collect()
}

fn status_of(error: RequestStatus) -> Status {
    Status::with_details(Code::from(error.code), error.message, Bytes::from(error.details))
}
