//! Credits: a per-key balance that calls spend, with an optional calendar refill.
//!
//! * [`Refill`] is `N/day` or `N/month` ([`Refill::parse`], the one parser). Refills are
//!   calendar based in UTC, as in Unkey: `/day` at 00:00 UTC, `/month` on the 1st at
//!   00:00 UTC. A refill sets the balance to `N` (what is left of the old period is not
//!   carried over).
//! * [`Credits`] is the stored state of a key that has credits. `epoch` counts refills and
//!   `set`s: a lease taken in an older epoch is not given back ([`Credits::give_back`]).
//! * Spending goes through leases ([`Credits::lease`]): a process takes a block of units
//!   from the store atomically (after applying a refill that is due) and spends it
//!   locally; unspent units go back at close. Each backend runs [`Credits::lease`] (or
//!   the same arithmetic in SQL / Lua for the Python stores) in one atomic step.
//! * Changes made by an operator ([`CreditChange`]) are applied by the manager as a
//!   compare-and-set on `(balance, epoch)`, retried when a lease landed in between.

use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};
use serde::Serialize;

use super::KeyError;

/// The largest balance or refill amount: 2^53, so that every value is exact in a
/// JavaScript number and a JSON double.
pub const MAX_CREDITS: u64 = 1 << 53;

/// How often a refill tops the balance up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RefillPeriod {
    /// Every day at 00:00 UTC.
    Day,
    /// On the 1st of every month at 00:00 UTC.
    Month,
}

impl RefillPeriod {
    /// `"day"` or `"month"`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Day => "day",
            Self::Month => "month",
        }
    }

    /// The period named by [`RefillPeriod::as_str`]'s output, or `None`.
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "day" => Some(Self::Day),
            "month" => Some(Self::Month),
            _ => None,
        }
    }

    /// The start of the period holding `now` (00:00 UTC of its day, or of the 1st of its
    /// month).
    #[must_use]
    pub fn start(self, now: DateTime<Utc>) -> DateTime<Utc> {
        let date = now.date_naive();
        let first = match self {
            Self::Day => date,
            Self::Month => date.with_day(1).unwrap_or(date),
        };
        midnight(first)
    }

    /// The first top-up strictly after `now`: the next 00:00 UTC, or the next 1st of a
    /// month at 00:00 UTC.
    #[must_use]
    pub fn next_after(self, now: DateTime<Utc>) -> DateTime<Utc> {
        let date = now.date_naive();
        let next = match self {
            Self::Day => date.succ_opt(),
            Self::Month => {
                let (y, m) = if date.month() == 12 {
                    (date.year() + 1, 1)
                } else {
                    (date.year(), date.month() + 1)
                };
                NaiveDate::from_ymd_opt(y, m, 1)
            }
        };
        next.map_or(DateTime::<Utc>::MAX_UTC, midnight)
    }
}

fn midnight(date: NaiveDate) -> DateTime<Utc> {
    Utc.from_utc_datetime(&date.and_time(chrono::NaiveTime::MIN))
}

/// A refill: `amount` units every `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refill {
    /// The balance after a top-up (1 ..= [`MAX_CREDITS`]).
    pub amount: u64,
    /// When top-ups happen.
    pub period: RefillPeriod,
}

const REFILL_FORMS: &str = "use N/day (tops up to N at 00:00 UTC every day) or N/month (on the \
                            1st at 00:00 UTC), N a whole number from 1 to 9007199254740992, \
                            e.g. 5000/month";

impl Refill {
    /// Parses `"5000/month"` or `"100/day"` (spaces around the parts are ignored).
    ///
    /// # Errors
    /// [`KeyError::InvalidInput`] (field `refill`) naming the accepted forms.
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let bad = |why: &str| KeyError::InvalidInput {
            field: "refill",
            reason: format!("{:?} {why}; {REFILL_FORMS}", truncate(text)),
        };
        let (n, period) = text.split_once('/').ok_or_else(|| bad("is not a refill"))?;
        let period = RefillPeriod::parse(period.trim().to_ascii_lowercase().as_str())
            .ok_or_else(|| bad("has an unknown period"))?;
        let n = n.trim();
        if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad("does not start with a whole number of credits"));
        }
        let amount: u64 = n.parse().map_err(|_| bad("has too large an amount"))?;
        if amount == 0 {
            return Err(bad("refills nothing"));
        }
        if amount > MAX_CREDITS {
            return Err(bad("has too large an amount"));
        }
        Ok(Self { amount, period })
    }

    /// The canonical text, `"5000/month"`.
    #[must_use]
    pub fn canonical(&self) -> String {
        format!("{}/{}", self.amount, self.period.as_str())
    }
}

impl std::fmt::Display for Refill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.amount, self.period.as_str())
    }
}

fn truncate(text: &str) -> String {
    text.chars().take(64).collect()
}

/// Checks a balance given by a caller (`field` names it in the message).
///
/// # Errors
/// [`KeyError::InvalidInput`] if it is negative or above [`MAX_CREDITS`].
pub fn check_amount(value: i128, field: &'static str) -> Result<u64, KeyError> {
    if value < 0 {
        return Err(KeyError::InvalidInput {
            field,
            reason: format!("{value} is negative; give a whole number from 0 to {MAX_CREDITS}"),
        });
    }
    u64::try_from(value)
        .ok()
        .filter(|&v| v <= MAX_CREDITS)
        .ok_or_else(|| KeyError::InvalidInput {
            field,
            reason: format!("{value} is above the largest balance, {MAX_CREDITS} (2**53)"),
        })
}

/// The stored credit state of a key that has credits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Credits {
    /// Units left in the store (not counting what processes hold in leases).
    pub balance: u64,
    /// The refill, if any.
    #[serde(serialize_with = "ser_refill")]
    pub refill: Option<Refill>,
    /// Running out means "would refuse" (audited), not a refusal.
    pub shadow: bool,
    /// What "below 10 %" is measured against: the refill amount; without a refill, the
    /// balance right after the last create / `set_credits` / `add_credits`.
    pub base: u64,
    /// The start of the period of the last top-up (or the time credits were set).
    pub refilled_at: DateTime<Utc>,
    /// The next top-up (`Some` exactly when there is a refill).
    pub refill_at: Option<DateTime<Utc>>,
    /// Counts refills and `set`s: leases from an older epoch are not given back.
    pub epoch: u64,
}

#[allow(clippy::ref_option, reason = "serde's serialize_with signature")]
fn ser_refill<S: serde::Serializer>(r: &Option<Refill>, s: S) -> Result<S::Ok, S::Error> {
    match r {
        Some(r) => s.serialize_some(&r.canonical()),
        None => s.serialize_none(),
    }
}

/// A block of units taken from the store by [`Credits::lease`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreditLease {
    /// Units granted (`min(want, balance)`): may be 0.
    pub granted: u64,
    /// The store balance after the grant.
    pub balance_after: u64,
    /// The next top-up, if any.
    pub refill_at: Option<DateTime<Utc>>,
    /// The epoch the lease belongs to (see [`Credits::epoch`]).
    pub epoch: u64,
    /// See [`Credits::base`].
    pub base: u64,
    /// See [`Credits::shadow`].
    pub shadow: bool,
}

/// An operator's change to a key's credits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreditChange {
    /// The balance becomes this (`None`: the key loses its credits, i.e. is unlimited).
    /// Outstanding leases are not given back afterwards (a new epoch starts).
    Set(Option<u64>),
    /// The balance changes by this; it never goes below 0 (a larger debit leaves 0).
    Add(i64),
}

/// Period bounds at one instant, for stores that apply refills in SQL or Lua: the start
/// of the current period and the next top-up, per period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeriodBounds {
    /// The instant.
    pub now: DateTime<Utc>,
    /// 00:00 UTC today.
    pub day_start: DateTime<Utc>,
    /// 00:00 UTC tomorrow.
    pub day_next: DateTime<Utc>,
    /// 00:00 UTC on the 1st of this month.
    pub month_start: DateTime<Utc>,
    /// 00:00 UTC on the 1st of next month.
    pub month_next: DateTime<Utc>,
}

impl PeriodBounds {
    /// The bounds at `now`.
    #[must_use]
    pub fn at(now: DateTime<Utc>) -> Self {
        Self {
            now,
            day_start: RefillPeriod::Day.start(now),
            day_next: RefillPeriod::Day.next_after(now),
            month_start: RefillPeriod::Month.start(now),
            month_next: RefillPeriod::Month.next_after(now),
        }
    }
}

impl Credits {
    /// The credits a new key starts with: `credits` (or, given only a refill, the refill
    /// amount), `None` if neither is given.
    ///
    /// # Errors
    /// [`KeyError::InvalidInput`] for a balance above [`MAX_CREDITS`].
    pub fn initial(
        credits: Option<u64>,
        refill: Option<Refill>,
        shadow: bool,
        now: DateTime<Utc>,
    ) -> Result<Option<Self>, KeyError> {
        let balance = match (credits, refill) {
            (None, None) => {
                if shadow {
                    return Err(KeyError::InvalidInput {
                        field: "credits_shadow",
                        reason: "is set but the key has no credits; give credits or a refill"
                            .to_owned(),
                    });
                }
                return Ok(None);
            }
            (Some(c), _) => c,
            (None, Some(r)) => r.amount,
        };
        check_amount(i128::from(balance), "credits")?;
        Ok(Some(Self {
            balance,
            refill,
            shadow,
            base: refill.map_or(balance, |r| r.amount),
            refilled_at: now,
            refill_at: refill.map(|r| r.period.next_after(now)),
            epoch: 0,
        }))
    }

    /// Applies a top-up that is due at `now`; whether one was.
    pub fn refill_if_due(&mut self, now: DateTime<Utc>) -> bool {
        let (Some(refill), Some(at)) = (self.refill, self.refill_at) else {
            return false;
        };
        if now < at {
            return false;
        }
        self.balance = refill.amount;
        self.base = refill.amount;
        self.refilled_at = refill.period.start(now);
        self.refill_at = Some(refill.period.next_after(now));
        self.epoch += 1;
        true
    }

    /// The state as it reads at `now` (a due top-up applied), for display.
    #[must_use]
    pub fn view_at(&self, now: DateTime<Utc>) -> Self {
        let mut view = self.clone();
        view.refill_if_due(now);
        view
    }

    /// Takes `min(want, balance)` units after applying a top-up due at `now`.
    pub fn lease(&mut self, want: u64, now: DateTime<Utc>) -> CreditLease {
        self.refill_if_due(now);
        let granted = want.min(self.balance);
        self.balance -= granted;
        CreditLease {
            granted,
            balance_after: self.balance,
            refill_at: self.refill_at,
            epoch: self.epoch,
            base: self.base,
            shadow: self.shadow,
        }
    }

    /// Gives back `n` unspent units of a lease of `epoch`; ignored (false) if the epoch
    /// moved on (a top-up or a `set` since). Never above [`MAX_CREDITS`].
    pub fn give_back(&mut self, n: u64, epoch: u64) -> bool {
        if epoch != self.epoch || n == 0 {
            return false;
        }
        self.balance = self.balance.saturating_add(n).min(MAX_CREDITS);
        true
    }

    /// The state after `change` at `now` (`None`: no credits). A top-up due at `now` is
    /// applied first. Without credits before, `Set(Some(n))` and `Add(n)` (n >= 0) give the
    /// key `n` credits without refill.
    ///
    /// # Errors
    /// [`KeyError::InvalidInput`] for a result above [`MAX_CREDITS`].
    pub fn changed(
        current: Option<&Self>,
        change: &CreditChange,
        now: DateTime<Utc>,
    ) -> Result<Option<Self>, KeyError> {
        let Some(cur) = current else {
            let start = match change {
                CreditChange::Set(None) => return Ok(None),
                CreditChange::Set(Some(n)) => i128::from(*n),
                CreditChange::Add(n) => i128::from(*n).max(0),
            };
            let n = check_amount(start, "credits")?;
            return Self::initial(Some(n), None, false, now);
        };
        let mut next = cur.view_at(now);
        match change {
            CreditChange::Set(None) => return Ok(None),
            CreditChange::Set(Some(n)) => {
                next.balance = check_amount(i128::from(*n), "credits")?;
                next.epoch += 1;
                next.refilled_at = now;
            }
            CreditChange::Add(n) => {
                let sum = (i128::from(next.balance) + i128::from(*n)).max(0);
                next.balance = check_amount(sum, "credits")?;
            }
        }
        if next.refill.is_none() {
            next.base = next.balance;
        }
        Ok(Some(next))
    }
}

/// Whether the stored state `a` still is `b` for a compare-and-set: both absent, or both
/// present with the same balance and epoch (every grant and give-back changes the balance,
/// every top-up and `set` the epoch).
#[must_use]
pub fn same_state(a: Option<&Credits>, b: Option<&Credits>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => a.balance == b.balance && a.epoch == b.epoch,
        _ => false,
    }
}

#[cfg(test)]
fn ymd(t: DateTime<Utc>) -> (i32, u32, u32) {
    (t.year(), t.month(), t.day())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn parses_the_two_forms_and_nothing_else() {
        assert_eq!(
            Refill::parse("5000/month").unwrap(),
            Refill {
                amount: 5000,
                period: RefillPeriod::Month
            }
        );
        assert_eq!(Refill::parse(" 7 / Day ").unwrap().canonical(), "7/day");
        assert_eq!(
            Refill::parse("9007199254740992/day").unwrap().amount,
            MAX_CREDITS
        );
        for bad in [
            "5/fortnight",
            "0/day",
            "-1/day",
            "5/week",
            "5",
            "",
            "/day",
            "five/day",
            "1.5/day",
            "9007199254740993/day",
            "99999999999999999999999/month",
            "+5/day",
        ] {
            let err = Refill::parse(bad).unwrap_err();
            let msg = err.to_string();
            assert!(
                matches!(
                    err,
                    KeyError::InvalidInput {
                        field: "refill",
                        ..
                    }
                ),
                "{bad}: {msg}"
            );
            assert!(
                msg.contains("N/day") && msg.contains("N/month"),
                "{bad}: {msg}"
            );
        }
    }

    #[test]
    fn day_boundaries() {
        let p = RefillPeriod::Day;
        assert_eq!(
            p.next_after(at("2026-03-04T00:00:00Z")),
            at("2026-03-05T00:00:00Z")
        );
        assert_eq!(
            p.next_after(at("2026-03-04T23:59:59.999Z")),
            at("2026-03-05T00:00:00Z")
        );
        assert_eq!(
            p.next_after(at("2026-12-31T12:00:00Z")),
            at("2027-01-01T00:00:00Z")
        );
        assert_eq!(
            p.next_after(at("2028-02-28T01:00:00Z")),
            at("2028-02-29T00:00:00Z")
        );
        assert_eq!(
            p.next_after(at("2027-02-28T01:00:00Z")),
            at("2027-03-01T00:00:00Z")
        );
        assert_eq!(
            p.start(at("2026-03-04T17:12:00Z")),
            at("2026-03-04T00:00:00Z")
        );
    }

    #[test]
    fn month_boundaries() {
        let p = RefillPeriod::Month;
        assert_eq!(
            p.next_after(at("2026-12-31T23:59:59Z")),
            at("2027-01-01T00:00:00Z")
        );
        assert_eq!(
            p.next_after(at("2026-12-01T00:00:00Z")),
            at("2027-01-01T00:00:00Z")
        );
        assert_eq!(
            p.next_after(at("2028-01-31T10:00:00Z")),
            at("2028-02-01T00:00:00Z")
        );
        assert_eq!(
            p.next_after(at("2028-02-29T10:00:00Z")),
            at("2028-03-01T00:00:00Z")
        );
        assert_eq!(
            p.start(at("2028-02-29T10:00:00Z")),
            at("2028-02-01T00:00:00Z")
        );
        assert_eq!(ymd(p.start(at("2027-01-01T00:00:00Z"))), (2027, 1, 1));
    }

    #[test]
    fn refill_tops_up_to_n_at_the_boundary_and_not_before() {
        let refill = Refill::parse("10/day").unwrap();
        let t0 = at("2026-06-30T22:00:00Z");
        let mut c = Credits::initial(Some(3), Some(refill), false, t0)
            .unwrap()
            .unwrap();
        assert_eq!(c.refill_at, Some(at("2026-07-01T00:00:00Z")));
        assert_eq!(c.base, 10);
        let l = c.lease(2, at("2026-06-30T23:59:59.999Z"));
        assert_eq!((l.granted, l.balance_after, l.epoch), (2, 1, 0));
        let l = c.lease(5, at("2026-06-30T23:59:59.999Z"));
        assert_eq!((l.granted, l.balance_after), (1, 0));
        let l = c.lease(0, at("2026-06-30T23:59:59.999Z"));
        assert_eq!((l.granted, l.balance_after), (0, 0));
        // Midnight: the balance becomes 10, a new epoch, the next top-up tomorrow.
        let l = c.lease(4, at("2026-07-01T00:00:00Z"));
        assert_eq!((l.granted, l.balance_after, l.epoch), (4, 6, 1));
        assert_eq!(l.refill_at, Some(at("2026-07-02T00:00:00Z")));
        assert_eq!(c.refilled_at, at("2026-07-01T00:00:00Z"));
        // A lease of the old epoch is not given back; one of this epoch is.
        assert!(!c.give_back(2, 0));
        assert!(c.give_back(2, 1));
        assert_eq!(c.balance, 8);
        // Leftovers are not carried: several days later, still 10 (one top-up).
        let l = c.lease(0, at("2026-07-05T13:00:00Z"));
        assert_eq!((l.balance_after, l.epoch), (10, 2));
        assert_eq!(l.refill_at, Some(at("2026-07-06T00:00:00Z")));
    }

    #[test]
    fn monthly_refill_across_the_year_and_a_leap_february() {
        let refill = Refill::parse("5000/month").unwrap();
        let mut c = Credits::initial(None, Some(refill), false, at("2027-12-15T08:00:00Z"))
            .unwrap()
            .unwrap();
        assert_eq!(c.balance, 5000, "refill without credits starts full");
        c.lease(5000, at("2027-12-31T23:59:59Z"));
        assert_eq!(c.lease(1, at("2027-12-31T23:59:59.999Z")).granted, 0);
        let l = c.lease(1, at("2028-01-01T00:00:00Z"));
        assert_eq!((l.granted, l.balance_after), (1, 4999));
        assert_eq!(l.refill_at, Some(at("2028-02-01T00:00:00Z")));
        c.lease(4999, at("2028-02-29T23:00:00Z"));
        assert_eq!(c.balance, 5000 - 4999, "topped up on Feb 1st");
        assert_eq!(c.refill_at, Some(at("2028-03-01T00:00:00Z")));
    }

    #[test]
    fn changes() {
        let now = at("2026-01-10T10:00:00Z");
        assert_eq!(
            Credits::changed(None, &CreditChange::Set(None), now).unwrap(),
            None
        );
        let c = Credits::changed(None, &CreditChange::Set(Some(50)), now)
            .unwrap()
            .unwrap();
        assert_eq!((c.balance, c.base, c.refill), (50, 50, None));
        let c2 = Credits::changed(Some(&c), &CreditChange::Add(-80), now)
            .unwrap()
            .unwrap();
        assert_eq!((c2.balance, c2.epoch), (0, 0), "floors at 0, same epoch");
        let c3 = Credits::changed(Some(&c), &CreditChange::Add(25), now)
            .unwrap()
            .unwrap();
        assert_eq!((c3.balance, c3.base), (75, 75));
        let c4 = Credits::changed(Some(&c), &CreditChange::Set(Some(7)), now)
            .unwrap()
            .unwrap();
        assert_eq!((c4.balance, c4.epoch), (7, 1), "a set starts a new epoch");
        assert!(Credits::changed(Some(&c), &CreditChange::Set(None), now)
            .unwrap()
            .is_none());
        let err = Credits::changed(Some(&c), &CreditChange::Add(i64::MAX), now).unwrap_err();
        assert!(err.to_string().contains("2**53"), "{err}");
        assert!(check_amount(-1, "credits").is_err());
        assert!(check_amount(i128::from(MAX_CREDITS) + 1, "credits").is_err());
        // With a refill the base stays the refill amount; a due top-up comes first.
        let r = Refill::parse("100/day").unwrap();
        let c = Credits::initial(Some(3), Some(r), true, now)
            .unwrap()
            .unwrap();
        let next_day = at("2026-01-11T00:00:01Z");
        let c5 = Credits::changed(Some(&c), &CreditChange::Add(5), next_day)
            .unwrap()
            .unwrap();
        assert_eq!(
            (c5.balance, c5.base, c5.epoch, c5.shadow),
            (105, 100, 1, true)
        );
        assert!(Credits::initial(None, None, true, now).is_err());
    }
}

/// The credit operations on every backend, through the manager.
#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly")]
mod store_tests {
    use std::sync::Arc;

    use chrono::Utc;
    use serde_json::Map;

    use super::*;
    use crate::keystore::testing::*;
    use crate::keystore::{CreditSpec, KeyBackend, KeyManager, SqliteBackend};

    fn spec(credits: Option<u64>, refill: Option<&str>, shadow: bool) -> CreditSpec {
        CreditSpec {
            credits,
            refill: refill.map(|r| Refill::parse(r).unwrap()),
            shadow,
        }
    }

    fn create(m: &KeyManager, s: &CreditSpec) -> (crate::keystore::KeyRecord, String) {
        m.create_with_credits("c", &[], None, Map::new(), false, s)
            .unwrap()
    }

    #[test]
    fn credits_are_stored_changed_and_read_back_on_every_backend() {
        for (name, m, _dir) in managers() {
            let (plain, _) = m.create("plain", &[], None, Map::new()).unwrap();
            assert_eq!(plain.credits, None, "{name}");
            let (rec, _) = create(&m, &spec(None, Some("5000/month"), true));
            let c = m.get(&rec.id).unwrap().credits.unwrap();
            assert_eq!(
                (c.balance, c.base, c.shadow, c.epoch),
                (5000, 5000, true, 0),
                "{name}"
            );
            assert_eq!(c.refill.unwrap().canonical(), "5000/month");
            assert_eq!(
                c.refill_at,
                Some(RefillPeriod::Month.next_after(Utc::now())),
                "{name}"
            );
            // set / add bump the revision (other processes' caches see the change).
            let before = m.get(&rec.id).unwrap().revision;
            let after = m
                .change_credits(&rec.id, &CreditChange::Add(-4990))
                .unwrap();
            assert!(after.revision > before, "{name}");
            assert_eq!(after.credits.as_ref().unwrap().balance, 10);
            assert_eq!(m.get(&rec.id).unwrap(), after, "{name}");
            let set = m
                .change_credits(&rec.id, &CreditChange::Set(Some(3)))
                .unwrap();
            assert_eq!(set.credits.as_ref().unwrap().balance, 3);
            assert_eq!(set.credits.as_ref().unwrap().epoch, 1);
            // A key without credits gets them by set; None removes them.
            let got = m
                .change_credits(&plain.id, &CreditChange::Set(Some(7)))
                .unwrap();
            assert_eq!(got.credits.as_ref().unwrap().base, 7, "{name}");
            let gone = m
                .change_credits(&plain.id, &CreditChange::Set(None))
                .unwrap();
            assert_eq!(gone.credits, None);
            assert_eq!(m.get(&plain.id).unwrap().credits, None, "{name}");
            assert!(matches!(
                m.change_credits("fmg_key_AAAAAAAAAAAAAAAA", &CreditChange::Add(1)),
                Err(KeyError::NotFound { .. })
            ));
            assert!(matches!(
                m.lease_credits("fmg_key_AAAAAAAAAAAAAAAA", 1, Utc::now()),
                Err(KeyError::NotFound { .. })
            ));
            assert_eq!(m.lease_credits(&plain.id, 1, Utc::now()).unwrap(), None);
        }
    }

    #[test]
    fn leases_subtract_and_give_back_within_their_epoch() {
        for (name, m, _dir) in managers() {
            let (rec, _) = create(&m, &spec(Some(10), None, false));
            let now = Utc::now();
            let l = m.lease_credits(&rec.id, 4, now).unwrap().unwrap();
            assert_eq!(
                (l.granted, l.balance_after, l.refill_at),
                (4, 6, None),
                "{name}"
            );
            let rev = m.get(&rec.id).unwrap().revision;
            assert_eq!(rev, rec.revision, "a lease is not a change: {name}");
            assert!(m.return_credits(&rec.id, 3, l.epoch).unwrap());
            assert_eq!(m.get(&rec.id).unwrap().credits.unwrap().balance, 9);
            let l = m.lease_credits(&rec.id, 100, now).unwrap().unwrap();
            assert_eq!((l.granted, l.balance_after), (9, 0), "{name}");
            // A set starts a new epoch: the old lease is not given back.
            m.change_credits(&rec.id, &CreditChange::Set(Some(2)))
                .unwrap();
            assert!(!m.return_credits(&rec.id, 9, l.epoch).unwrap(), "{name}");
            assert_eq!(m.get(&rec.id).unwrap().credits.unwrap().balance, 2);
        }
    }

    #[test]
    fn a_refill_at_midnight_is_applied_by_the_lease_that_finds_it_due() {
        for (name, m, _dir) in managers() {
            let (rec, _) = create(&m, &spec(Some(2), Some("10/day"), false));
            let midnight = rec.credits.as_ref().unwrap().refill_at.unwrap();
            let before = midnight - chrono::Duration::milliseconds(1);
            let l = m.lease_credits(&rec.id, 5, before).unwrap().unwrap();
            assert_eq!((l.granted, l.balance_after, l.epoch), (2, 0, 0), "{name}");
            let l = m.lease_credits(&rec.id, 5, midnight).unwrap().unwrap();
            assert_eq!((l.granted, l.balance_after, l.epoch), (5, 5, 1), "{name}");
            assert_eq!(
                l.refill_at,
                Some(midnight + chrono::Duration::days(1)),
                "{name}"
            );
            // The lease of the old day is dropped, not given back.
            assert!(!m.return_credits(&rec.id, 2, 0).unwrap());
            assert_eq!(m.get(&rec.id).unwrap().credits.unwrap().balance, 5);
        }
    }

    #[test]
    fn concurrent_leases_never_grant_a_unit_twice() {
        const N: u64 = 500;
        // Memory: threads sharing one store. SQLite: threads over two connections to one
        // file (two processes' worth of writers).
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.db");
        let a = KeyManager::sqlite(&path, opts()).unwrap();
        let b: Arc<dyn KeyBackend> = Arc::new(SqliteBackend::open(&path).unwrap());
        let (rec, _) = create(&a, &spec(Some(N), None, false));
        let mem = KeyManager::memory(opts()).unwrap();
        let (mrec, _) = create(&mem, &spec(Some(N), None, false));
        let mem_backend = Arc::clone(&mem.inner.backend);
        let sqlite_a = Arc::clone(&a.inner.backend);
        for (name, backends, id) in [
            ("sqlite", vec![sqlite_a, b], rec.id.clone()),
            (
                "memory",
                vec![Arc::clone(&mem_backend), mem_backend],
                mrec.id.clone(),
            ),
        ] {
            let granted: u64 = std::thread::scope(|s| {
                let handles: Vec<_> = (0..8)
                    .map(|i| {
                        let backend = Arc::clone(&backends[i % 2]);
                        let id = id.clone();
                        s.spawn(move || {
                            let mut mine = 0;
                            loop {
                                let want = 1 + (i as u64 % 3);
                                let l = backend.lease_credits(&id, want, Utc::now()).unwrap();
                                let g = l.unwrap().granted;
                                if g == 0 {
                                    return mine;
                                }
                                mine += g;
                            }
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).sum()
            });
            assert_eq!(granted, N, "{name}");
        }
        assert_eq!(a.get(&rec.id).unwrap().credits.unwrap().balance, 0);
    }

    #[test]
    fn rotation_moves_the_credits_to_the_new_key() {
        for (name, m, _dir) in managers() {
            let (rec, _) = create(&m, &spec(Some(40), Some("100/month"), true));
            m.lease_credits(&rec.id, 15, Utc::now()).unwrap();
            let (new, _) = m.rotate(&rec.id, chrono::Duration::hours(1)).unwrap();
            let moved = new.credits.clone().unwrap();
            assert_eq!(
                (
                    moved.balance,
                    moved.base,
                    moved.shadow,
                    moved.refill.unwrap().canonical()
                ),
                (25, 100, true, "100/month".to_owned()),
                "{name}"
            );
            assert_eq!(m.get(&new.id).unwrap(), new, "{name}");
            let old = m.get(&rec.id).unwrap().credits.unwrap();
            assert_eq!(
                (old.balance, old.refill, old.refill_at),
                (0, None, None),
                "{name}"
            );
            // A key without credits rotates to one without credits.
            let (plain, _) = m.create("p", &[], None, Map::new()).unwrap();
            let (np, _) = m.rotate(&plain.id, chrono::Duration::hours(1)).unwrap();
            assert_eq!(np.credits, None);
        }
    }

    #[test]
    fn verification_carries_the_credit_flag() {
        for (name, m, _dir) in managers() {
            let (_, plain) = m.create("p", &[], None, Map::new()).unwrap();
            let (_, shadow) = create(&m, &spec(Some(1), None, true));
            let (_, enforced) = create(&m, &spec(Some(1), None, false));
            assert_eq!(m.verify(&plain, None).unwrap().credits, None, "{name}");
            assert_eq!(m.verify(&shadow, None).unwrap().credits, Some(true));
            assert_eq!(m.verify(&enforced, None).unwrap().credits, Some(false));
        }
    }

    #[test]
    fn a_version_2_file_gains_the_credit_columns_and_keeps_its_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.db");
        {
            let conn = rusqlite::Connection::open(&path).unwrap();
            for m in &crate::keystore::sqlite::MIGRATIONS[..2] {
                conn.execute_batch(m.sql).unwrap();
            }
            conn.execute_batch(
                "CREATE TABLE schema_version (version INTEGER NOT NULL);
                 INSERT INTO schema_version VALUES (2);
                 UPDATE fmg_meta SET revision = 1;
                 INSERT INTO fmg_keys (id, name, phc_hash, scopes, metadata, status, created_at,
                     revision) VALUES ('fmg_key_AAAAAAAAAAAAAAAA', 'old', '$argon2id$x', '[]',
                     '{}', 'active', 1700000000000, 1);",
            )
            .unwrap();
        }
        let m = KeyManager::sqlite(&path, opts()).unwrap();
        let rec = m.get("fmg_key_AAAAAAAAAAAAAAAA").unwrap();
        assert_eq!((rec.name.as_str(), rec.credits), ("old", None));
        let got = m
            .change_credits(&rec.id, &CreditChange::Set(Some(9)))
            .unwrap();
        assert_eq!(got.credits.unwrap().balance, 9);
        drop(m);
        let reopened = SqliteBackend::open(&path).unwrap();
        assert_eq!(
            reopened
                .get("fmg_key_AAAAAAAAAAAAAAAA")
                .unwrap()
                .unwrap()
                .credits
                .unwrap()
                .balance,
            9
        );
    }

    #[test]
    fn bad_credit_input_is_refused_at_creation() {
        let m = KeyManager::memory(opts()).unwrap();
        for s in [
            spec(Some(MAX_CREDITS + 1), None, false),
            spec(None, None, true),
        ] {
            let err = m
                .create_with_credits("c", &[], None, Map::new(), false, &s)
                .unwrap_err();
            assert!(matches!(err, KeyError::InvalidInput { .. }), "{err}");
        }
        assert!(m.list(true).unwrap().is_empty(), "nothing was created");
    }
}
