//! When each upstream's work runs: one job at a time per upstream (a fetch with its services'
//! checkouts, or checkouts asked for outside a fetch), the next fetch after `interval`, and who is
//! waiting for which cycle.
//!
//! Pure: time comes in as an argument, jobs and waiters are opaque, and nothing here spawns or
//! sends. The actor asks [`Upstream::start`] what to run, runs it, and calls [`Upstream::done`]
//! with the wait until the next fetch; the waiters it returns are answered.

use std::time::Duration;

use tokio::time::Instant;

/// One upstream's schedule. `W` is whoever waits for a cycle (an operator's pull), `J` a checkout
/// job queued outside a fetch (a rollback, a wipe).
#[derive(Debug)]
pub struct Upstream<W, J> {
    /// When the next fetch is due.
    next: Instant,
    /// A job of this upstream runs: nothing else may use its store.
    busy: bool,
    /// Jobs finished since start.
    cycles: u64,
    /// Checkouts asked for outside a fetch, run when the store is free, before any fetch.
    queued: Vec<J>,
    /// Waiting for those checkouts.
    queued_waiters: Vec<W>,
    /// Waiting for the running (or, when idle, the next) job to end.
    waiters: Vec<W>,
    /// A fetch was asked for while one ran, which may have read the heads before the push that
    /// asked: another one starts as soon as this one ends.
    again: bool,
    /// Waiting for that next fetch.
    after: Vec<W>,
    /// Services were added to it since its last fetch started: it does not count as cycled until a
    /// fetch starts after the change.
    stale: bool,
}

/// What [`Upstream::start`] says to run now.
#[derive(Debug, PartialEq, Eq)]
pub enum Start<J> {
    /// The fetch (then the checkouts it calls for).
    Fetch,
    /// Checkouts queued outside a fetch.
    Checkouts(Vec<J>),
}

impl<W, J> Upstream<W, J> {
    /// A new upstream, due at once.
    pub fn new(now: Instant) -> Upstream<W, J> {
        Upstream {
            next: now,
            busy: false,
            cycles: 0,
            queued: Vec::new(),
            queued_waiters: Vec::new(),
            waiters: Vec::new(),
            again: false,
            after: Vec::new(),
            stale: false,
        }
    }

    /// Makes a fetch that starts after this call due now, and has `waiter` answered when it
    /// ends: the next fetch when one runs already (it may have read the heads before the push that
    /// asked).
    pub fn fetch_now(&mut self, now: Instant, waiter: Option<W>) {
        if self.busy {
            self.again = true;
            self.after.extend(waiter);
        } else {
            self.next = now;
            self.waiters.extend(waiter);
        }
    }

    /// Services were added to (or moved onto) the upstream: fetch now, and do not count as
    /// cycled before that fetch starts.
    pub fn changed(&mut self, now: Instant) {
        self.stale = true;
        self.fetch_now(now, None);
    }

    /// Queues checkouts to run when the store is free, `waiter` answered once they ran (not when
    /// a fetch running now ends).
    pub fn queue(&mut self, jobs: impl IntoIterator<Item = J>, waiter: Option<W>) {
        self.queued.extend(jobs);
        self.queued_waiters.extend(waiter);
    }

    /// What to run now, if anything; the upstream is busy until [`Upstream::done`].
    pub fn start(&mut self, now: Instant) -> Option<Start<J>> {
        if self.busy {
            return None;
        }
        if !self.queued.is_empty() {
            self.busy = true;
            // A fetch due now, and its waiters, come right after these checkouts.
            if self.next <= now || !self.waiters.is_empty() {
                self.again = true;
            }
            self.after.append(&mut self.waiters);
            self.waiters = std::mem::take(&mut self.queued_waiters);
            return Some(Start::Checkouts(std::mem::take(&mut self.queued)));
        }
        if self.next <= now {
            self.busy = true;
            self.stale = false;
            return Some(Start::Fetch);
        }
        None
    }

    /// The running job ended: the next fetch is due after `wait` (at once when one was asked for
    /// meanwhile). Returns the waiters to answer now.
    pub fn done(&mut self, now: Instant, wait: Duration) -> Vec<W> {
        self.busy = false;
        self.cycles += 1;
        self.next = if std::mem::take(&mut self.again) {
            now
        } else {
            now + wait
        };
        std::mem::replace(&mut self.waiters, std::mem::take(&mut self.after))
    }

    /// When this upstream wants to start something; `None` while a job runs.
    pub fn due(&self, now: Instant) -> Option<Instant> {
        match (self.busy, self.queued.is_empty()) {
            (true, _) => None,
            (false, false) => Some(now),
            (false, true) => Some(self.next),
        }
    }

    /// A job runs.
    pub fn busy(&self) -> bool {
        self.busy
    }

    /// Nothing runs and nothing was asked to run right after.
    pub fn settled(&self) -> bool {
        !self.busy && !self.again
    }

    /// It was fetched at least once since start and since services were added to it.
    pub fn cycled(&self) -> bool {
        self.cycles > 0 && !self.stale
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_secs(60);

    fn up(now: Instant) -> Upstream<&'static str, u8> {
        Upstream::new(now)
    }

    #[test]
    fn a_new_upstream_fetches_at_once_then_after_the_interval() {
        let t = Instant::now();
        let mut u = up(t);
        assert!(!u.cycled());
        assert_eq!(u.start(t), Some(Start::Fetch));
        assert_eq!(u.start(t), None, "one job at a time");
        assert_eq!(u.due(t), None);
        assert_eq!(u.done(t, WAIT), Vec::<&str>::new());
        assert!(u.cycled());
        assert_eq!(u.due(t), Some(t + WAIT));
        assert_eq!(u.start(t + WAIT / 2), None);
        assert_eq!(u.start(t + WAIT), Some(Start::Fetch));
    }

    #[test]
    fn a_pull_while_idle_is_answered_by_the_next_fetch() {
        let t = Instant::now();
        let mut u = up(t);
        u.start(t);
        u.done(t, WAIT);
        u.fetch_now(t + Duration::from_secs(1), Some("pull"));
        assert_eq!(u.start(t + Duration::from_secs(1)), Some(Start::Fetch));
        assert_eq!(u.done(t + Duration::from_secs(2), WAIT), vec!["pull"]);
    }

    #[test]
    fn a_pull_during_a_fetch_gets_a_fetch_of_its_own() {
        let t = Instant::now();
        let mut u = up(t);
        u.start(t);
        u.fetch_now(t, Some("pull"));
        assert!(!u.settled());
        // The running fetch may have read the heads before the push: not the pull's answer.
        assert_eq!(u.done(t, WAIT), Vec::<&str>::new());
        assert_eq!(u.due(t), Some(t), "the next fetch is due at once");
        assert_eq!(u.start(t), Some(Start::Fetch));
        assert_eq!(u.done(t, WAIT), vec!["pull"]);
        assert!(u.settled());
        assert_eq!(u.due(t), Some(t + WAIT));
    }

    #[test]
    fn queued_checkouts_run_before_a_fetch_and_answer_their_waiter() {
        let t = Instant::now();
        let mut u = up(t);
        u.start(t);
        u.queue([7], Some("rollback"));
        assert_eq!(u.start(t), None, "the store is busy");
        u.done(t, WAIT);
        assert_eq!(u.due(t), Some(t), "queued work is due at once");
        assert_eq!(u.start(t), Some(Start::Checkouts(vec![7])));
        assert_eq!(u.done(t, WAIT), vec!["rollback"]);
        assert_eq!(u.start(t), None);
    }

    #[test]
    fn a_pull_waiting_for_a_fetch_is_not_answered_by_queued_checkouts() {
        let t = Instant::now();
        let mut u = up(t);
        u.start(t);
        u.done(t, WAIT);
        u.fetch_now(t, Some("pull"));
        u.queue([7], Some("wipe"));
        assert_eq!(u.start(t), Some(Start::Checkouts(vec![7])));
        assert_eq!(u.done(t, WAIT), vec!["wipe"]);
        assert_eq!(u.start(t), Some(Start::Fetch), "the pull's fetch, at once");
        assert_eq!(u.done(t, WAIT), vec!["pull"]);
    }

    #[test]
    fn services_added_make_it_uncycled_until_a_fetch_starts() {
        let t = Instant::now();
        let mut u = up(t);
        u.start(t);
        u.done(t, WAIT);
        u.changed(t);
        assert!(!u.cycled());
        assert_eq!(u.start(t), Some(Start::Fetch));
        u.done(t, WAIT);
        assert!(u.cycled());
    }
}
