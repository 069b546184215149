//! Actions on registry resources and GitLab access levels.

use std::fmt;

use serde::{Deserialize, Serialize};

/// One action of the Docker registry token spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    Pull,
    Push,
    Delete,
    /// `*`: every action; used for `registry:catalog:*`.
    All,
}

impl Action {
    pub fn parse(s: &str) -> Option<Action> {
        match s {
            "pull" => Some(Action::Pull),
            "push" => Some(Action::Push),
            "delete" => Some(Action::Delete),
            "*" => Some(Action::All),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Pull => "pull",
            Action::Push => "push",
            Action::Delete => "delete",
            Action::All => "*",
        }
    }

    const fn bit(self) -> u8 {
        match self {
            Action::Pull => 1,
            Action::Push => 2,
            Action::Delete => 4,
            Action::All => 8,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A small set of actions, printed in canonical order (`pull,push,delete,*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ActionSet(u8);

impl ActionSet {
    pub const EMPTY: ActionSet = ActionSet(0);
    const ORDER: [Action; 4] = [Action::Pull, Action::Push, Action::Delete, Action::All];

    pub fn of(actions: &[Action]) -> ActionSet {
        actions.iter().fold(ActionSet::EMPTY, |s, a| s.with(*a))
    }

    #[must_use]
    pub fn with(self, a: Action) -> ActionSet {
        ActionSet(self.0 | a.bit())
    }

    pub fn contains(self, a: Action) -> bool {
        self.0 & a.bit() != 0
    }

    /// True when every action of `needed` is in `self`; `*` in `self` grants everything.
    pub fn covers(self, needed: ActionSet) -> bool {
        self.contains(Action::All) || self.0 & needed.0 == needed.0
    }

    #[must_use]
    pub fn without(self, a: Action) -> ActionSet {
        ActionSet(self.0 & !a.bit())
    }

    #[must_use]
    pub fn intersect(self, other: ActionSet) -> ActionSet {
        ActionSet(self.0 & other.0)
    }

    #[must_use]
    pub fn union(self, other: ActionSet) -> ActionSet {
        ActionSet(self.0 | other.0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn iter(self) -> impl Iterator<Item = Action> {
        Self::ORDER.into_iter().filter(move |a| self.contains(*a))
    }

    pub fn to_vec(self) -> Vec<String> {
        self.iter().map(|a| a.as_str().to_owned()).collect()
    }
}

impl fmt::Display for ActionSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for a in self.iter() {
            if !first {
                f.write_str(",")?;
            }
            first = false;
            f.write_str(a.as_str())?;
        }
        Ok(())
    }
}

/// GitLab access levels (GitLab's protected container repositories), with their GitLab numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccessLevel {
    NoAccess,
    MinimalAccess,
    Guest,
    Planner,
    Reporter,
    Developer,
    Maintainer,
    Owner,
    Admin,
}

impl AccessLevel {
    pub const fn number(self) -> u8 {
        match self {
            AccessLevel::NoAccess => 0,
            AccessLevel::MinimalAccess => 5,
            AccessLevel::Guest => 10,
            AccessLevel::Planner => 15,
            AccessLevel::Reporter => 20,
            AccessLevel::Developer => 30,
            AccessLevel::Maintainer => 40,
            AccessLevel::Owner => 50,
            AccessLevel::Admin => 60,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            AccessLevel::NoAccess => "no_access",
            AccessLevel::MinimalAccess => "minimal_access",
            AccessLevel::Guest => "guest",
            AccessLevel::Planner => "planner",
            AccessLevel::Reporter => "reporter",
            AccessLevel::Developer => "developer",
            AccessLevel::Maintainer => "maintainer",
            AccessLevel::Owner => "owner",
            AccessLevel::Admin => "admin",
        }
    }
}

impl AccessLevel {
    /// The level with GitLab number `n`, if it is one.
    pub fn from_number(n: u8) -> Option<AccessLevel> {
        const ALL: [AccessLevel; 9] = [
            AccessLevel::NoAccess,
            AccessLevel::MinimalAccess,
            AccessLevel::Guest,
            AccessLevel::Planner,
            AccessLevel::Reporter,
            AccessLevel::Developer,
            AccessLevel::Maintainer,
            AccessLevel::Owner,
            AccessLevel::Admin,
        ];
        ALL.into_iter().find(|l| l.number() == n)
    }

    /// Registry actions a principal at this level has on a project's repositories: pull
    /// from reporter (anyone may pull a public or internal project: `public` adds it), push
    /// from developer, delete from maintainer; admins everything.
    pub fn registry_actions(self, public: bool) -> ActionSet {
        let mut set = ActionSet::EMPTY;
        if self >= AccessLevel::Reporter || public {
            set = set.with(Action::Pull);
        }
        if self >= AccessLevel::Developer {
            set = set.with(Action::Push);
        }
        if self >= AccessLevel::Maintainer {
            set = set.with(Action::Delete);
        }
        set
    }
}

impl fmt::Display for AccessLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.number())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn action_set_covers_and_prints_in_order() {
        let s = ActionSet::of(&[Action::Push, Action::Pull]);
        assert_eq!(s.to_string(), "pull,push");
        assert!(s.covers(ActionSet::of(&[Action::Pull])));
        assert!(!s.covers(ActionSet::of(&[Action::Delete])));
        assert!(ActionSet::of(&[Action::All]).covers(ActionSet::of(&[Action::Delete])));
        assert!(ActionSet::EMPTY.covers(ActionSet::EMPTY));
    }

    #[test]
    fn levels_are_ordered_like_gitlab_numbers() {
        assert!(AccessLevel::Reporter < AccessLevel::Developer);
        assert_eq!(AccessLevel::Owner.number(), 50);
        let l: AccessLevel = serde_json::from_str("\"maintainer\"").unwrap();
        assert_eq!(l, AccessLevel::Maintainer);
    }
}
