//! The background loops' one way to retry: doubling waits, and following a head that moves.

use std::{fmt::Display, future::Future, time::Duration};

use tokio::sync::watch;
use tracing::warn;

/// Doubling waits between a background task's retries, from `first` up to `most`.
pub(crate) struct Backoff {
    first: Duration,
    most: Duration,
    next: Duration,
}

impl Backoff {
    /// Waits that start at `first` and double up to `most`.
    pub(crate) const fn new(first: Duration, most: Duration) -> Self {
        Backoff {
            first,
            most,
            next: first,
        }
    }

    /// The wait before the next retry; the one after it is twice as long, up to the most.
    pub(crate) fn next_wait(&mut self) -> Duration {
        let wait = self.next;
        self.next = (wait * 2).min(self.most);
        wait
    }

    /// Starts the waits over, after a success.
    pub(crate) fn reset(&mut self) {
        self.next = self.first;
    }
}

/// Runs `step` with `head`'s value for as long as it makes progress (`Some(Ok(true))`), waits for `head`
/// to move when it has nothing to do (`Some(Ok(false))`), and retries a failure after a doubling wait,
/// logged as "`what` failed". Returns when `step` returns `None`, when `head`'s sender is gone or when
/// `stop` completes.
pub(crate) async fn follow<E, F, Fut>(
    mut head: watch::Receiver<u64>,
    what: &str,
    stop: impl Future<Output = ()>,
    mut step: F,
) where
    E: Display,
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = Option<Result<bool, E>>>,
{
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
    tokio::pin!(stop);
    loop {
        // marks this value seen first: a move during the step wakes the wait below
        let target = *head.borrow_and_update();
        let retry_in = match step(target).await {
            None => return,
            Some(Ok(true)) => {
                backoff.reset();
                continue;
            }
            Some(Ok(false)) => {
                backoff.reset();
                None
            }
            Some(Err(error)) => {
                let wait = backoff.next_wait();
                warn!(%error, retry_in = ?wait, "{what} failed");
                Some(wait)
            }
        };
        match retry_in {
            None => tokio::select! {
                changed = head.changed() => if changed.is_err() { return },
                () = &mut stop => return,
            },
            Some(wait) => tokio::select! {
                () = tokio::time::sleep(wait) => {},
                () = &mut stop => return,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::{mpsc, oneshot};

    use super::*;

    #[test]
    fn waits_double_up_to_the_most_and_start_over_after_a_success() {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_millis(300));
        let waits: Vec<u128> = (0..5).map(|_| backoff.next_wait().as_millis()).collect();
        assert_eq!(waits, [50, 100, 200, 300, 300]);
        backoff.reset();
        assert_eq!(backoff.next_wait(), Duration::from_millis(50));
    }

    /// Follows `head` with steps that answer `results` in turn, then `Ok(false)`; sends each step's target.
    fn follower(
        head: watch::Receiver<u64>,
        stop: oneshot::Receiver<()>,
        results: Vec<Result<bool, &'static str>>,
    ) -> (tokio::task::JoinHandle<()>, mpsc::UnboundedReceiver<u64>) {
        let (stepped, steps) = mpsc::unbounded_channel();
        let mut results = results.into_iter();
        let task = tokio::spawn(async move {
            let stop = async {
                let _ = stop.await;
            };
            follow(head, "test step", stop, |target| {
                let _ = stepped.send(target);
                let result = results.next().unwrap_or(Ok(false));
                async move { Some(result) }
            })
            .await;
        });
        (task, steps)
    }

    #[tokio::test]
    async fn follow_steps_while_it_makes_progress_retries_failures_and_waits_for_moves() {
        let (moved, head) = watch::channel(0u64);
        let (_stop, stop) = oneshot::channel();
        let (task, mut steps) = follower(head, stop, vec![Ok(true), Err("down"), Ok(false)]);
        assert_eq!(steps.recv().await, Some(0));
        assert_eq!(steps.recv().await, Some(0), "progress: steps again at once");
        assert_eq!(
            steps.recv().await,
            Some(0),
            "a failure: steps again after a wait"
        );
        tokio::task::yield_now().await;
        assert!(steps.try_recv().is_err(), "nothing to do: waits for a move");
        moved.send(7).expect("the follower holds the head");
        assert_eq!(steps.recv().await, Some(7), "a move wakes it");
        drop(moved);
        task.await.expect("returns once the head's sender is gone");
    }

    #[tokio::test]
    async fn follow_returns_when_stopped_while_waiting() {
        let (_moved, head) = watch::channel(0u64);
        let (stop_now, stop) = oneshot::channel();
        let (task, mut steps) = follower(head, stop, vec![Err("down")]);
        assert_eq!(steps.recv().await, Some(0));
        stop_now.send(()).expect("the follower holds the stop");
        task.await.expect("returns once stopped");
        assert_eq!(steps.recv().await, None, "no step after the stop");
    }
}
