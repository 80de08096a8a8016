//! The TCP ring's second thread, kept for the ring's life. Every step of a ring operation
//! sends one chunk while it receives another; a scoped thread per step cost a thread's
//! creation and teardown each time (clone, a stack and a signal stack mapped and unmapped:
//! about ten system calls), three times a training step. This thread is made once and handed
//! each step's sending as a job.

use std::panic::AssertUnwindSafe;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::thread::JoinHandle;

use crate::WorkerError;

type Job = Box<dyn FnOnce() -> Result<(), WorkerError> + Send + 'static>;
type Outcome = std::thread::Result<Result<(), WorkerError>>;

pub(crate) struct SendThread {
    jobs: Option<Sender<Job>>,
    outcomes: Receiver<Outcome>,
    thread: Option<JoinHandle<()>>,
}

impl SendThread {
    pub fn start() -> Result<SendThread, WorkerError> {
        let (jobs, queue) = channel::<Job>();
        let (report, outcomes) = channel::<Outcome>();
        let thread = std::thread::Builder::new()
            .name("ring-sender".into())
            .spawn(move || {
                for job in queue {
                    if report.send(std::panic::catch_unwind(AssertUnwindSafe(job))).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| WorkerError::Collective(format!("starting the ring's sender thread: {e}")))?;
        Ok(SendThread { jobs: Some(jobs), outcomes, thread: Some(thread) })
    }

    /// Runs `send` on the sender thread while `here` runs on this one, and returns both
    /// results once both are done (never before: `send` may borrow what the caller owns).
    pub fn both<'a, R>(&mut self, send: impl FnOnce() -> Result<(), WorkerError> + Send + 'a, here: impl FnOnce() -> R) -> (R, Result<(), WorkerError>) {
        let job: Box<dyn FnOnce() -> Result<(), WorkerError> + Send + 'a> = Box::new(send);
        // SAFETY: the job's borrows live for 'a, which outlasts this call, and this call does
        // not end, by returning or by unwinding, before the job has run to its end: `Wait`
        // receives its outcome in its drop. The sender thread runs nothing else meanwhile.
        let job: Job = unsafe { std::mem::transmute::<Box<dyn FnOnce() -> Result<(), WorkerError> + Send + 'a>, Job>(job) };
        let Some(jobs) = &self.jobs else { return (here(), Err(gone())) };
        if let Err(unsent) = jobs.send(job) {
            // The thread has ended: the job comes back unrun.
            drop(unsent);
            return (here(), Err(gone()));
        }
        /// Waits for the job's outcome if `here` unwinds.
        struct Wait<'w> {
            outcomes: &'w Receiver<Outcome>,
            pending: bool,
        }
        impl Drop for Wait<'_> {
            fn drop(&mut self) {
                if self.pending {
                    // An error means the thread has ended, and the job with it.
                    let _ = self.outcomes.recv();
                }
            }
        }
        let mut wait = Wait { outcomes: &self.outcomes, pending: true };
        let mine = here();
        wait.pending = false;
        let sent = match self.outcomes.recv() {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(WorkerError::Collective("the ring's sender thread panicked".into())),
            Err(_) => Err(gone()),
        };
        (mine, sent)
    }
}

fn gone() -> WorkerError {
    WorkerError::Collective("the ring's sender thread is gone".into())
}

impl Drop for SendThread {
    fn drop(&mut self) {
        // Closing the queue ends the thread.
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_run_beside_the_caller_and_borrow_what_it_owns() {
        let mut t = SendThread::start().unwrap();
        for i in 0..100u64 {
            let mut sent = vec![0u64; 1000];
            let out = &mut sent;
            let (here, there) = t.both(
                move || {
                    out.iter_mut().enumerate().for_each(|(k, x)| *x = k as u64 * i);
                    Ok(())
                },
                || i + 1,
            );
            assert_eq!((here, there.is_ok()), (i + 1, true));
            assert_eq!(sent[999], 999 * i);
        }
        // An error and a panic in a job come back as errors; the thread goes on.
        let (_, e) = t.both(|| Err(WorkerError::Collective("no".into())), || ());
        assert!(e.unwrap_err().to_string().contains("no"));
        let (_, e) = t.both(|| panic!("boom"), || ());
        assert!(e.unwrap_err().to_string().contains("panicked"));
        let (_, ok) = t.both(|| Ok(()), || ());
        assert!(ok.is_ok());
    }

    #[test]
    fn a_panic_here_still_waits_for_the_job() {
        let mut t = SendThread::start().unwrap();
        let done = std::sync::atomic::AtomicBool::new(false);
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
            t.both(
                || {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    done.store(true, std::sync::atomic::Ordering::SeqCst);
                    Ok(())
                },
                || panic!("here"),
            )
        }));
        assert!(r.is_err());
        assert!(done.load(std::sync::atomic::Ordering::SeqCst), "returned before the job ended");
    }
}
