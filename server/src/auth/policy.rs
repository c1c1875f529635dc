//! Who may do what: the policy file (principals, tenants, allow and deny lists) combined with the
//! publisher registry kept in the store.
//!
//! Deny by default. A request is allowed when an allow entry of the principal covers it and no deny
//! entry touches it; the registry only adds publish grants (types and sources) for its principal in
//! its tenant, so a deny in the file always wins.

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;

use crate::{event::TypePattern, store::Publisher};

/// A `*` glob over names (groups, sources, admin resources): `*` matches any run of characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob(String);

impl Glob {
    /// Parses a glob; it must not be empty.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Err("must not be empty".into());
        }
        Ok(Glob(text.to_owned()))
    }

    /// Tells whether `name` matches.
    pub fn matches(&self, name: &str) -> bool {
        let mut parts = self.0.split('*');
        let first = parts.next().unwrap_or_default();
        let Some(mut rest) = name.strip_prefix(first) else {
            return false;
        };
        let tail: Vec<&str> = parts.collect();
        let Some((last, middle)) = tail.split_last() else {
            return rest.is_empty();
        };
        for part in middle {
            match rest.find(part) {
                Some(at) => rest = &rest[at + part.len()..],
                None => return false,
            }
        }
        rest.len() >= last.len() && rest.ends_with(last)
    }
}

/// The actions the policy grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Publish,
    Subscribe,
    Request,
    Reply,
    Replay,
    Admin,
}

impl Action {
    /// The action's name in policy files and audit records.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Publish => "publish",
            Action::Subscribe => "subscribe",
            Action::Request => "request",
            Action::Reply => "reply",
            Action::Replay => "replay",
            Action::Admin => "admin",
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct GrantsFile {
    publish: Vec<String>,
    subscribe: Vec<String>,
    groups: Vec<String>,
    request: Vec<String>,
    reply: Vec<String>,
    replay: Vec<String>,
    admin: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PrincipalFile {
    id: String,
    #[serde(default)]
    tenant: Option<String>,
    #[serde(default)]
    sources: Option<Vec<String>>,
    #[serde(default)]
    allow: GrantsFile,
    #[serde(default)]
    deny: GrantsFile,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    principal: Vec<PrincipalFile>,
}

/// Type grants of one action, and the group and admin globs.
#[derive(Debug, Clone, Default)]
pub struct Grants {
    types: HashMap<Action, Vec<TypePattern>>,
    groups: Vec<Glob>,
    admin: Vec<Glob>,
}

impl Grants {
    fn parse(file: GrantsFile, at: &str) -> Result<Self, String> {
        let mut types = HashMap::new();
        for (action, list) in [
            (Action::Publish, file.publish),
            (Action::Subscribe, file.subscribe),
            (Action::Request, file.request),
            (Action::Reply, file.reply),
            (Action::Replay, file.replay),
        ] {
            let parsed = list
                .iter()
                .map(|p| {
                    TypePattern::parse(p)
                        .map_err(|e| format!("{at}.{}: pattern {p:?}: {e}", action.as_str()))
                })
                .collect::<Result<Vec<_>, _>>()?;
            types.insert(action, parsed);
        }
        let globs = |list: Vec<String>, key: &str| {
            list.iter()
                .map(|g| Glob::parse(g).map_err(|e| format!("{at}.{key}: {e}")))
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(Grants {
            types,
            groups: globs(file.groups, "groups")?,
            admin: globs(file.admin, "admin")?,
        })
    }

    fn patterns(&self, action: Action) -> &[TypePattern] {
        self.types.get(&action).map(Vec::as_slice).unwrap_or(&[])
    }
}

/// One principal of the policy file.
#[derive(Debug, Clone)]
pub struct PrincipalPolicy {
    pub tenant: Option<String>,
    sources: Option<Vec<Glob>>,
    allow: Grants,
    deny: Grants,
}

/// The parsed policy file.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    principals: HashMap<String, PrincipalPolicy>,
}

/// Checks a tenant name: `[A-Za-z0-9][A-Za-z0-9_-]*`, at most 64 bytes (it becomes part of keys).
pub fn validate_tenant(tenant: &str) -> Result<(), String> {
    let mut chars = tenant.chars();
    let ok = tenant.len() <= 64
        && matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "tenant {tenant:?} is not [A-Za-z0-9][A-Za-z0-9_-]* of at most 64 bytes"
        ))
    }
}

impl Policy {
    /// Parses and checks a TOML policy; errors name the principal and key.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: PolicyFile = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut principals = HashMap::new();
        for (i, p) in file.principal.into_iter().enumerate() {
            let at = format!("principal[{i}] ({:?})", p.id);
            if p.id.is_empty() {
                return Err(format!("principal[{i}]: id must not be empty"));
            }
            if let Some(tenant) = &p.tenant {
                validate_tenant(tenant).map_err(|e| format!("{at}: {e}"))?;
            }
            let sources = p
                .sources
                .map(|list| {
                    list.iter()
                        .map(|g| Glob::parse(g).map_err(|e| format!("{at}.sources: {e}")))
                        .collect::<Result<Vec<_>, _>>()
                })
                .transpose()?;
            let entry = PrincipalPolicy {
                tenant: p.tenant,
                sources,
                allow: Grants::parse(p.allow, &format!("{at}.allow"))?,
                deny: Grants::parse(p.deny, &format!("{at}.deny"))?,
            };
            if principals.insert(p.id.clone(), entry).is_some() {
                return Err(format!("{at}: principal {:?} is listed twice", p.id));
            }
        }
        Ok(Policy { principals })
    }

    /// Reads and parses a policy file.
    pub fn load(path: &std::path::Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Policy::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The file's entry of a principal.
    pub fn principal(&self, id: &str) -> Option<&PrincipalPolicy> {
        self.principals.get(id)
    }
}

/// A registered publisher, parsed.
#[derive(Debug, Clone)]
pub struct RegisteredPublisher {
    types: Vec<TypePattern>,
    sources: Vec<Glob>,
}

/// The publisher registry, by (tenant, principal).
#[derive(Debug, Clone, Default)]
pub struct Registry {
    entries: BTreeMap<(String, String), RegisteredPublisher>,
}

impl Registry {
    /// Builds the registry from stored publishers; entries that no longer parse are skipped.
    pub fn new(publishers: &[Publisher]) -> Self {
        let mut entries = BTreeMap::new();
        for p in publishers {
            match parse_publisher(&p.types, &p.sources) {
                Ok(entry) => {
                    entries.insert((p.tenant.clone(), p.principal.clone()), entry);
                }
                Err(error) => {
                    tracing::warn!(tenant = %p.tenant, principal = %p.principal, %error, "skipping a registered publisher");
                }
            }
        }
        Registry { entries }
    }
}

/// Checks the types and sources of a publisher registration.
pub fn parse_publisher(
    types: &[String],
    sources: &[String],
) -> Result<RegisteredPublisher, String> {
    if types.is_empty() {
        return Err("types: a publisher needs at least one type pattern".into());
    }
    Ok(RegisteredPublisher {
        types: types
            .iter()
            .enumerate()
            .map(|(i, t)| TypePattern::parse(t).map_err(|e| format!("types[{i}]: {e}")))
            .collect::<Result<_, _>>()?,
        sources: sources
            .iter()
            .enumerate()
            .map(|(i, s)| Glob::parse(s).map_err(|e| format!("sources[{i}]: {e}")))
            .collect::<Result<_, _>>()?,
    })
}

/// A decision with the reason for a denial.
pub type Decision = Result<(), String>;

/// Whether `source` is the id's own by default: the id, or what lies under it (`<id>/...`), taken
/// literally.
fn owns(id: &str, source: &str) -> bool {
    source == id
        || source
            .strip_prefix(id)
            .is_some_and(|under| under.starts_with('/'))
}

/// Evaluates requests of one principal against the policy and the registry.
#[derive(Debug)]
pub struct Evaluator<'a> {
    pub id: &'a str,
    pub tenant: &'a str,
    pub policy: &'a Policy,
    pub registry: &'a Registry,
}

impl Evaluator<'_> {
    fn file(&self) -> Option<&PrincipalPolicy> {
        self.policy.principal(self.id)
    }

    fn registered(&self) -> Option<&RegisteredPublisher> {
        self.registry
            .entries
            .get(&(self.tenant.to_owned(), self.id.to_owned()))
    }

    /// Is storing an event of this type kept from the principal by its `deny.publish`? A reply is
    /// checked so too: its own type is stored like a published one.
    pub fn publish_not_denied(&self, event_type: &str) -> Decision {
        match self
            .file()
            .into_iter()
            .flat_map(|f| f.deny.patterns(Action::Publish))
            .find(|p| p.matches(event_type))
        {
            Some(deny) => Err(format!("publishing {event_type:?} is denied by {deny}")),
            None => Ok(()),
        }
    }

    /// Do the principal's publish grants (file or registry) cover this type? Denials aside.
    fn publish_granted(&self, event_type: &str) -> bool {
        self.file()
            .into_iter()
            .flat_map(|f| f.allow.patterns(Action::Publish))
            .chain(self.registered().into_iter().flat_map(|r| &r.types))
            .any(|p| p.matches(event_type))
    }

    /// May the principal publish an event of this type with this source?
    pub fn publish(&self, event_type: &str, source: &str) -> Decision {
        self.publish_not_denied(event_type)?;
        if !self.publish_granted(event_type) {
            return Err(format!(
                "{:?} is not registered to publish {event_type:?}",
                self.id
            ));
        }
        self.source(source)
    }

    /// May the principal store a reply of this type? A reply is an event in the log like a published
    /// one, which subscribers of its type receive: its type must be one the principal may publish or
    /// answer (its `reply` grant), and not one its `deny.publish` names.
    pub fn reply_type(&self, event_type: &str) -> Decision {
        self.publish_not_denied(event_type)?;
        if self.typed(Action::Reply, event_type).is_ok() || self.publish_granted(event_type) {
            Ok(())
        } else {
            Err(format!(
                "{:?} may neither publish nor answer {event_type:?}, so may not reply with it",
                self.id
            ))
        }
    }

    /// May the principal send events (publishes, requests, replies) with this source?
    pub fn source(&self, source: &str) -> Decision {
        // the principal's own sources: the file's list, else its id and what lies under it, taken
        // literally (an id is no glob: a certificate for *.agents.example must not own every agent's)
        let own = match self.file().and_then(|f| f.sources.as_ref()) {
            Some(list) => list.iter().any(|g| g.matches(source)),
            // what lies under another principal's id of the file is that one's, though it lies
            // under this id too (`svc` must not publish as `svc/worker`)
            None => {
                owns(self.id, source)
                    && !self
                        .policy
                        .principals
                        .keys()
                        .any(|other| other.len() > self.id.len() && owns(other, source))
            }
        };
        let source_ok = own
            || self
                .registered()
                .into_iter()
                .flat_map(|r| &r.sources)
                .any(|g| g.matches(source));
        if source_ok {
            Ok(())
        } else {
            Err(format!(
                "source {source:?} does not belong to {:?}",
                self.id
            ))
        }
    }

    /// Does no `deny` pattern of `action` overlap what the patterns select?
    pub fn read_not_denied(&self, action: Action, patterns: &[TypePattern]) -> Decision {
        let Some(file) = self.file() else {
            return Ok(());
        };
        for pattern in patterns {
            if let Some(deny) = file
                .deny
                .patterns(action)
                .iter()
                .find(|d| d.overlaps(pattern))
            {
                return Err(format!(
                    "{} of {pattern} is denied by {deny}",
                    action.as_str()
                ));
            }
        }
        Ok(())
    }

    /// May the principal receive every type the patterns select (subscribe, request-side reads, replay)?
    pub fn read(&self, action: Action, patterns: &[TypePattern]) -> Decision {
        let Some(file) = self.file() else {
            return Err(format!("{:?} has no {} grants", self.id, action.as_str()));
        };
        self.read_not_denied(action, patterns)?;
        for pattern in patterns {
            if !file
                .allow
                .patterns(action)
                .iter()
                .any(|a| a.covers(pattern))
            {
                return Err(format!(
                    "{:?} may not {} {pattern}",
                    self.id,
                    action.as_str()
                ));
            }
        }
        Ok(())
    }

    /// May the principal send a request of this type, or reply to one?
    pub fn typed(&self, action: Action, event_type: &str) -> Decision {
        let Some(file) = self.file() else {
            return Err(format!("{:?} has no {} grants", self.id, action.as_str()));
        };
        if let Some(deny) = file
            .deny
            .patterns(action)
            .iter()
            .find(|d| d.matches(event_type))
        {
            return Err(format!(
                "{} of {event_type:?} is denied by {deny}",
                action.as_str()
            ));
        }
        if file
            .allow
            .patterns(action)
            .iter()
            .any(|a| a.matches(event_type))
        {
            Ok(())
        } else {
            Err(format!(
                "{:?} may not {} {event_type:?}",
                self.id,
                action.as_str()
            ))
        }
    }

    /// May the principal join this group?
    pub fn group(&self, group: &str) -> Decision {
        self.glob(|g| &g.groups, group, "join group")
    }

    /// May the principal administer this resource (`groups/<name>`, `types/<type>`, `publishers/<id>`, `audit`)?
    pub fn admin(&self, resource: &str) -> Decision {
        self.glob(|g| &g.admin, resource, "administer")
    }

    fn glob(&self, list: impl Fn(&Grants) -> &Vec<Glob>, name: &str, what: &str) -> Decision {
        let Some(file) = self.file() else {
            return Err(format!("{:?} may not {what} {name:?}", self.id));
        };
        if let Some(deny) = list(&file.deny).iter().find(|g| g.matches(name)) {
            return Err(format!("{what} {name:?} is denied by {:?}", deny.0));
        }
        if list(&file.allow).iter().any(|g| g.matches(name)) {
            Ok(())
        } else {
            Err(format!("{:?} may not {what} {name:?}", self.id))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_runs_of_characters() {
        let g = |p: &str, n: &str| Glob(p.to_owned()).matches(n);
        assert!(g("*", ""));
        assert!(g("*", "anything"));
        assert!(g("planner-*", "planner-1"));
        assert!(!g("planner-*", "tester-1"));
        assert!(g("//svc/*/x", "//svc/a/b/x"));
        assert!(!g("a*a", "a"));
        assert!(g("exact", "exact"));
        assert!(!g("exact", "exact2"));
    }

    const POLICY: &str = r#"
[[principal]]
id = "planner"
tenant = "acme"
sources = ["//planner", "//planner/*"]
allow = { publish = ["task.>"], subscribe = ["task.>", "plan.*"], groups = ["planners"], replay = [">"], request = ["tool.*"], reply = ["plan.ask"], admin = ["groups/planners"] }
deny = { publish = ["task.secret.>"], replay = ["audit.>"] }
"#;

    #[test]
    fn allow_covers_and_deny_wins() {
        let policy = Policy::parse(POLICY).expect("parses");
        let registry = Registry::default();
        let e = Evaluator {
            id: "planner",
            tenant: "acme",
            policy: &policy,
            registry: &registry,
        };
        assert!(e.publish("task.created", "//planner/1").is_ok());
        assert!(e.publish("task.secret.key", "//planner").is_err());
        assert!(e.publish("plan.created", "//planner").is_err());
        assert!(e.publish("task.created", "//tester").is_err());
        let p = |s: &str| TypePattern::parse(s).expect("pattern");
        assert!(e.read(Action::Subscribe, &[p("task.created")]).is_ok());
        assert!(e.read(Action::Subscribe, &[p(">")]).is_err());
        assert!(e.read(Action::Replay, &[p("task.>")]).is_ok());
        assert!(
            e.read(Action::Replay, &[p(">")]).is_err(),
            "overlaps the deny"
        );
        assert!(e.group("planners").is_ok());
        assert!(e.group("testers").is_err());
        assert!(e.typed(Action::Request, "tool.run").is_ok());
        assert!(e.typed(Action::Reply, "tool.run").is_err());
        // a reply's own type: one it may publish or answer, never a denied one
        assert!(e.reply_type("task.done").is_ok());
        assert!(e.reply_type("plan.ask").is_ok());
        assert!(e.reply_type("task.secret.answer").is_err());
        assert!(e.reply_type("billing.paid").is_err());
        let denying = Policy::parse(
            r#"
[[principal]]
id = "tool"
allow = { reply = ["tool.>"] }
deny = { reply = ["tool.admin.>"] }
"#,
        )
        .expect("parses");
        let tool = Evaluator {
            id: "tool",
            policy: &denying,
            ..e
        };
        assert!(tool.reply_type("tool.run.result").is_ok());
        assert!(
            tool.reply_type("tool.admin.reset").is_err(),
            "a type it may not answer"
        );
        assert!(e.admin("groups/planners").is_ok());
        assert!(e.admin("audit").is_err());
    }

    #[test]
    fn registry_adds_publish_grants_in_its_tenant_only() {
        let policy = Policy::default();
        let publisher = |tenant: &str| Publisher {
            tenant: tenant.into(),
            principal: "svc".into(),
            types: vec!["order.*".into()],
            sources: vec!["//orders".into()],
            description: String::new(),
            updated_at: chrono::Utc::now(),
        };
        let registry = Registry::new(&[publisher("acme")]);
        let e = |tenant| Evaluator {
            id: "svc",
            tenant,
            policy: &policy,
            registry: &registry,
        };
        assert!(e("acme").publish("order.placed", "//orders").is_ok());
        assert!(e("acme").publish("order.placed", "//other").is_err());
        assert!(e("acme").publish("invoice.sent", "//orders").is_err());
        assert!(e("globex").publish("order.placed", "//orders").is_err());
    }

    #[test]
    fn an_id_owns_its_sources_literally_not_as_a_glob() {
        let (policy, registry) = (Policy::default(), Registry::new(&[]));
        let e = Evaluator {
            id: "*.agents.example",
            tenant: "default",
            policy: &policy,
            registry: &registry,
        };
        assert!(e.source("*.agents.example").is_ok());
        assert!(e.source("*.agents.example/worker-1").is_ok());
        assert!(e.source("planner.agents.example").is_err());
        assert!(e.source("x/planner.agents.example/y").is_err());
        assert!(e.source("*.agents.examplex").is_err());
    }

    /// Without `sources`, an id owns what lies under it, but not what is another principal's:
    /// `svc` may not publish as `svc/worker`, which owns its own and what lies under it.
    #[test]
    fn an_id_does_not_own_the_sources_of_a_principal_under_it() {
        let policy =
            Policy::parse("[[principal]]\nid = \"svc\"\n[[principal]]\nid = \"svc/worker\"")
                .expect("parses");
        let registry = Registry::new(&[]);
        let e = |id| Evaluator {
            id,
            tenant: "default",
            policy: &policy,
            registry: &registry,
        };
        assert!(e("svc").source("svc/other").is_ok());
        assert!(e("svc").source("svc/worker").is_err());
        assert!(e("svc").source("svc/worker/1").is_err());
        assert!(e("svc").source("svc/workers").is_ok());
        assert!(e("svc/worker").source("svc/worker/1").is_ok());
    }

    #[test]
    fn bad_policies_are_refused_by_name() {
        for (text, expect) in [
            (
                "[[principal]]\nid = \"a\"\nallow = { publish = [\"a:b\"] }",
                "allow.publish",
            ),
            ("[[principal]]\nid = \"a\"\ntenant = \"a b\"", "tenant"),
            (
                "[[principal]]\nid = \"a\"\n[[principal]]\nid = \"a\"",
                "twice",
            ),
            (
                "[[principal]]\nid = \"a\"\nallow = { publsh = [] }",
                "publsh",
            ),
        ] {
            let err = Policy::parse(text).expect_err(text);
            assert!(err.contains(expect), "{err} should mention {expect}");
        }
    }
}
