//! How a control [`Request`] travels over HTTP: [`ROUTES`] is the one table of method, path
//! (with the model id as one path segment where a route takes one), query string and JSON body.
//! The server reads each route's request with it ([`Route::decode`]) and the client writes each
//! request with it ([`Request::call`]), so the two cannot disagree on a URL or a field. A POST
//! route changes something, and `http/auth.rs` lets only trusted callers reach those. Adding an
//! operation: see [`super::request`].
//!
//! Not here: `/blobs/{sha256}`, which other daemons (peers) read cache bytes from. It is a byte
//! stream with ranges and limits of its own, not an operation on models: no front end but HTTP
//! has it, and `http/blobs.rs` serves it itself.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::request::Selection;
use super::{ControlError, Request};

/// An HTTP method of a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// Reads: changes nothing.
    Get,
    /// Changes something: only callers trusted to act may call it (`http/auth.rs`).
    Post,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
        }
    }
}

/// A request as it arrived over HTTP: what a route reads its [`Request`] from.
pub struct Wire<'a> {
    /// The route's `{id}` segment, percent-decoded; empty for a route without one.
    pub id: String,
    /// The query string, without `?` (empty when none).
    pub query: &'a str,
    /// The body; only POST routes read it.
    pub body: &'a [u8],
    /// Whether the body was sent as JSON (`Content-Type: application/json`, or a `+json` type).
    pub json: bool,
}

impl Wire<'_> {
    /// The query string as `T`, whose fields are all the route takes: another field, or a
    /// value of the wrong type, is refused naming it (axum's `Query` reads it so; its words).
    fn query<T: DeserializeOwned>(&self) -> Result<T, WireError> {
        let fields =
            serde_urlencoded::Deserializer::new(form_urlencoded::parse(self.query.as_bytes()));
        serde_path_to_error::deserialize(fields).map_err(|e| WireError::Query(e.to_string()))
    }

    /// The JSON body as `T`, whose fields are all the route takes: an empty body reads as `{}`;
    /// any other must be sent as JSON and parse (naming the field and the fields accepted).
    fn body<T: DeserializeOwned>(&self) -> Result<T, WireError> {
        let text: &[u8] = if self.body.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else if self.json {
            self.body
        } else {
            return Err(WireError::NotJson);
        };
        serde_json::from_slice(text).map_err(|e| WireError::Body(e.to_string()))
    }

    /// `request`, on a GET route that takes no query string (a GET reads no body).
    fn no_query(&self, request: Request) -> Result<Request, WireError> {
        self.query::<Nothing>()?;
        Ok(request)
    }

    /// `request`, on a route that takes no query string and no body: only `{}` or nothing, so
    /// a flag sent where it is not read (`{"force": true}` to a pin) is refused rather than
    /// dropped.
    fn no_input(&self, request: Request) -> Result<Request, WireError> {
        self.query::<Nothing>()?;
        self.body::<Nothing>()?;
        Ok(request)
    }
}

/// Why a route could not read its request; each refusal is a 4xx.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("a request body must be JSON, sent with Content-Type: application/json")]
    NotJson,
    #[error("Failed to deserialize query string: {0}")]
    Query(String),
    #[error("request body: {0}")]
    Body(String),
    #[error(transparent)]
    Refused(#[from] ControlError),
}

impl WireError {
    /// HTTP status for this refusal.
    pub fn http_status(&self) -> u16 {
        match self {
            WireError::NotJson => 415,
            WireError::Query(_) | WireError::Body(_) => 400,
            WireError::Refused(e) => e.http_status(),
        }
    }
}

/// How one route carries a [`Request`].
pub struct Route {
    pub method: Method,
    /// The path, in axum's syntax: `{id}` is a model id, as one percent-encoded segment.
    pub path: &'static str,
    read: fn(&Wire<'_>) -> Result<Request, WireError>,
}

impl Route {
    /// Whether the path carries a model id (`{id}`).
    pub fn takes_id(&self) -> bool {
        self.path.contains("{id}")
    }

    /// The request `wire` makes on this route, or why it makes none. The query string is read
    /// before the body, so a request wrong in both is refused for its query.
    pub fn decode(&self, wire: &Wire<'_>) -> Result<Request, WireError> {
        (self.read)(wire)
    }

    /// A call of this route, for the model `id` if the path takes one.
    fn call(&self, id: Option<&str>) -> Call {
        let path = match id {
            Some(id) => self.path.replace("{id}", &path_segment(id)),
            None => self.path.to_string(),
        };
        Call {
            method: self.method,
            target: path,
            body: None,
        }
    }
}

/// A request as the HTTP client sends it.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub method: Method,
    /// Path and query string: `/models/t2v-A14B@2.2.0/pin`, `/gc?mode=auto&dry_run=false`.
    pub target: String,
    /// The JSON body, if the route takes one.
    pub body: Option<serde_json::Value>,
}

impl Call {
    fn query(mut self, fields: &impl Serialize) -> Call {
        let query = serde_urlencoded::to_string(fields).expect("flat fields encode");
        if !query.is_empty() {
            self.target = format!("{}?{query}", self.target);
        }
        self
    }

    fn body(mut self, fields: &impl Serialize) -> Call {
        self.body = Some(serde_json::to_value(fields).expect("plain fields encode"));
        self
    }
}

impl Request {
    /// This request as an HTTP call, written with its route from [`ROUTES`]. An operation with
    /// a route per model and one for several (`/models/{id}/ensure`, `/ensure`) is sent on the
    /// second, which takes every form of the request.
    pub fn call(&self) -> Call {
        match self {
            Request::Health { .. } => HEALTH.call(None),
            Request::Overview => OVERVIEW.call(None),
            Request::Models => MODELS.call(None),
            Request::Model { id } => MODEL.call(Some(id)),
            Request::Config => CONFIG.call(None),
            Request::Metrics => METRICS.call(None),
            Request::Events { limit } => EVENTS.call(None).query(&Limit {
                limit: Some(*limit),
            }),
            Request::ReportDaily { days } => {
                REPORT_DAILY.call(None).query(&Days { days: Some(*days) })
            }
            Request::ReportStorage { days } => {
                REPORT_STORAGE.call(None).query(&Days { days: Some(*days) })
            }
            Request::Ensure { models, force } => ENSURE.call(None).body(&EnsureBody {
                ids: ids_of(models),
                all: *models == Selection::All,
                force: *force,
            }),
            Request::Verify {
                models,
                report_only,
            } => VERIFY.call(None).body(&VerifyBody {
                ids: ids_of(models),
                all: *models == Selection::All,
                report_only: *report_only,
            }),
            Request::Gc { mode, dry_run } => GC.call(None).query(&GcQuery {
                mode: Some(mode.as_str().to_string()),
                dry_run: *dry_run,
            }),
            Request::Pin { id, pinned: true } => PIN.call(Some(id)),
            Request::Pin { id, pinned: false } => UNPIN.call(Some(id)),
            Request::Evict { id } => EVICT.call(Some(id)),
            Request::MarkCorrupted { ids } => MARK_CORRUPTED
                .call(None)
                .body(&MarkBody { ids: ids.clone() }),
        }
    }
}

fn ids_of(models: &Selection) -> Option<Vec<String>> {
    match models {
        Selection::All => None,
        Selection::Ids(ids) => Some(ids.clone()),
    }
}

/// A model id as one path segment of a URL: an id is the manifest's text, and a `/`, `?` or
/// `#` in it must not change the route.
fn path_segment(id: &str) -> String {
    const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~')
        .remove(b'@');
    percent_encoding::utf8_percent_encode(id, SEGMENT).to_string()
}

/// Every route of the control plane, in the order docs/CONTROL.md lists them.
pub static ROUTES: &[Route] = &[
    HEALTH,
    OVERVIEW,
    CONFIG,
    METRICS,
    MODELS,
    MODEL,
    EVENTS,
    REPORT_DAILY,
    REPORT_STORAGE,
    ENSURE_ONE,
    VERIFY_ONE,
    PIN,
    UNPIN,
    EVICT,
    MARK_ONE,
    ENSURE,
    VERIFY,
    MARK_CORRUPTED,
    GC,
];

const HEALTH: Route = Route {
    method: Method::Get,
    path: "/health",
    read: |w| w.no_query(Request::Health { check_mount: true }),
};

const OVERVIEW: Route = Route {
    method: Method::Get,
    path: "/health/models",
    read: |w| w.no_query(Request::Overview),
};

const CONFIG: Route = Route {
    method: Method::Get,
    path: "/config",
    read: |w| w.no_query(Request::Config),
};

const METRICS: Route = Route {
    method: Method::Get,
    path: "/metrics",
    read: |w| w.no_query(Request::Metrics),
};

const MODELS: Route = Route {
    method: Method::Get,
    path: "/models",
    read: |w| w.no_query(Request::Models),
};

const MODEL: Route = Route {
    method: Method::Get,
    path: "/models/{id}",
    read: |w| w.no_query(Request::Model { id: w.id.clone() }),
};

const EVENTS: Route = Route {
    method: Method::Get,
    path: "/events",
    read: |w| {
        let q: Limit = w.query()?;
        Ok(Request::Events {
            limit: q.limit.unwrap_or(Request::EVENTS_LIMIT),
        })
    },
};

const REPORT_DAILY: Route = Route {
    method: Method::Get,
    path: "/report/daily",
    read: |w| {
        let q: Days = w.query()?;
        Ok(Request::ReportDaily {
            days: q.days.unwrap_or(Request::DAILY_DAYS),
        })
    },
};

const REPORT_STORAGE: Route = Route {
    method: Method::Get,
    path: "/report/storage",
    read: |w| {
        let q: Days = w.query()?;
        Ok(Request::ReportStorage {
            days: q.days.unwrap_or(Request::STORAGE_DAYS),
        })
    },
};

const ENSURE_ONE: Route = Route {
    method: Method::Post,
    path: "/models/{id}/ensure",
    read: |w| {
        let q: Force = w.query()?;
        w.body::<Nothing>()?;
        Ok(Request::Ensure {
            models: Selection::Ids(vec![w.id.clone()]),
            force: q.force,
        })
    },
};

const VERIFY_ONE: Route = Route {
    method: Method::Post,
    path: "/models/{id}/verify",
    read: |w| {
        let q: ReportOnly = w.query()?;
        w.body::<Nothing>()?;
        Ok(Request::Verify {
            models: Selection::Ids(vec![w.id.clone()]),
            report_only: q.report_only,
        })
    },
};

const PIN: Route = Route {
    method: Method::Post,
    path: "/models/{id}/pin",
    read: |w| {
        w.no_input(Request::Pin {
            id: w.id.clone(),
            pinned: true,
        })
    },
};

const UNPIN: Route = Route {
    method: Method::Post,
    path: "/models/{id}/unpin",
    read: |w| {
        w.no_input(Request::Pin {
            id: w.id.clone(),
            pinned: false,
        })
    },
};

const EVICT: Route = Route {
    method: Method::Post,
    path: "/models/{id}/evict",
    read: |w| w.no_input(Request::Evict { id: w.id.clone() }),
};

const MARK_ONE: Route = Route {
    method: Method::Post,
    path: "/models/{id}/mark-corrupted",
    read: |w| {
        w.no_input(Request::MarkCorrupted {
            ids: vec![w.id.clone()],
        })
    },
};

const ENSURE: Route = Route {
    method: Method::Post,
    path: "/ensure",
    read: |w| {
        w.query::<Nothing>()?;
        let b: EnsureBody = w.body()?;
        Ok(Request::Ensure {
            models: selection(b.ids, b.all, "ids, all, force")?,
            force: b.force,
        })
    },
};

const VERIFY: Route = Route {
    method: Method::Post,
    path: "/verify",
    read: |w| {
        w.query::<Nothing>()?;
        let b: VerifyBody = w.body()?;
        Ok(Request::Verify {
            models: selection(b.ids, b.all, "ids, all, report_only")?,
            report_only: b.report_only,
        })
    },
};

const MARK_CORRUPTED: Route = Route {
    method: Method::Post,
    path: "/mark-corrupted",
    read: |w| {
        w.query::<Nothing>()?;
        let b: MarkBody = w.body()?;
        if b.ids.is_empty() {
            return Err(ControlError::BadRequest(
                "the body names no model: send {\"ids\": [\"ID\", ...]} (fields: ids)".into(),
            )
            .into());
        }
        Ok(Request::MarkCorrupted { ids: b.ids })
    },
};

const GC: Route = Route {
    method: Method::Post,
    path: "/gc",
    read: |w| {
        let q: GcQuery = w.query()?;
        w.body::<Nothing>()?;
        Ok(Request::Gc {
            mode: q.mode.as_deref().unwrap_or("auto").parse()?,
            dry_run: q.dry_run,
        })
    },
};

/// The models a bulk body names: its `ids`, or every model when it says `"all": true`. A body
/// that names none is refused: an empty or mistyped body must not start work on every model.
fn selection(ids: Option<Vec<String>>, all: bool, fields: &str) -> Result<Selection, WireError> {
    match (ids, all) {
        (Some(_), true) => Err(ControlError::BadRequest(
            "give either \"ids\" or \"all\": true, not both".into(),
        )
        .into()),
        (None, true) => Ok(Selection::All),
        (Some(ids), false) if !ids.is_empty() => Ok(Selection::Ids(ids)),
        (_, false) => Err(ControlError::BadRequest(format!(
            "the body names no model: send {{\"ids\": [\"ID\", ...]}} or {{\"all\": true}} \
             (fields: {fields})"
        ))
        .into()),
    }
}

// What each route's query string and body may say: every field it takes, and no other
// (`deny_unknown_fields`), so a typo is never read as "not given".

/// The query string or body of a route that takes none (`/blobs` takes no query string either).
#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "nothing, or an empty JSON object")]
pub struct Nothing {}

/// `?limit=N` of `GET /events`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Limit {
    limit: Option<usize>,
}

/// `?days=N` of `GET /report/*`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Days {
    days: Option<u64>,
}

/// `?force=true` of `POST /models/{id}/ensure`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Force {
    #[serde(default)]
    force: bool,
}

/// `?report_only=true` of `POST /models/{id}/verify`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReportOnly {
    #[serde(default)]
    report_only: bool,
}

/// `POST /ensure`'s body.
#[derive(Serialize, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a JSON object with ids or all, and force"
)]
struct EnsureBody {
    #[serde(skip_serializing_if = "Option::is_none")]
    ids: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    all: bool,
    #[serde(default)]
    force: bool,
}

/// `POST /verify`'s body.
#[derive(Serialize, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a JSON object with ids or all, and report_only"
)]
struct VerifyBody {
    #[serde(skip_serializing_if = "Option::is_none")]
    ids: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    all: bool,
    #[serde(default)]
    report_only: bool,
}

/// `POST /mark-corrupted`'s body: ids only, since marking every model at once drops the
/// whole cache (`POST /gc?mode=aggressive` is the way to that).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a JSON object with ids")]
struct MarkBody {
    #[serde(default)]
    ids: Vec<String>,
}

/// `?mode=…&dry_run=…` of `POST /gc`. The mode is read as text and parsed by
/// [`crate::control::GcMode`]'s `FromStr`, whose refusal lists the modes.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct GcQuery {
    mode: Option<String>,
    #[serde(default)]
    dry_run: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::GcMode;
    use crate::control::request::every_request;

    /// Reads `call` as the server does: its route by method and path, its id decoded.
    fn serve(call: &Call) -> (&'static Route, Request) {
        let (path, query) = call.target.split_once('?').unwrap_or((&call.target, ""));
        let body = call
            .body
            .as_ref()
            .map(|b| b.to_string())
            .unwrap_or_default();
        let mut found = ROUTES.iter().filter_map(|route| {
            if route.method != call.method {
                return None;
            }
            let id = match route.path.split_once("{id}") {
                None => (route.path == path).then(String::new)?,
                Some((before, after)) => {
                    let segment = path.strip_prefix(before)?.strip_suffix(after)?;
                    if segment.contains('/') {
                        return None;
                    }
                    percent_encoding::percent_decode_str(segment)
                        .decode_utf8()
                        .ok()?
                        .into_owned()
                }
            };
            let wire = Wire {
                id,
                query,
                body: body.as_bytes(),
                json: true,
            };
            Some((
                route,
                route.decode(&wire).expect("the route reads its own call"),
            ))
        });
        let served = found
            .next()
            .unwrap_or_else(|| panic!("no route for {call:?}"));
        assert!(found.next().is_none(), "two routes for {call:?}");
        served
    }

    #[test]
    fn every_request_comes_back_from_its_route() {
        for request in every_request() {
            assert_eq!(serve(&request.call()).1, request, "{:?}", request.call());
        }
    }

    /// The URLs and bodies scripts, the runbook and older `wan` binaries send.
    #[test]
    fn calls_are_the_documented_urls() {
        let call = |r: Request| {
            let c = r.call();
            (c.method.as_str(), c.target, c.body.map(|b| b.to_string()))
        };
        assert_eq!(
            call(Request::Gc {
                mode: GcMode::Auto,
                dry_run: false
            }),
            ("POST", "/gc?mode=auto&dry_run=false".into(), None)
        );
        assert_eq!(
            call(Request::ReportDaily { days: 1 }),
            ("GET", "/report/daily?days=1".into(), None)
        );
        assert_eq!(
            call(Request::Ensure {
                models: Selection::All,
                force: false
            }),
            (
                "POST",
                "/ensure".into(),
                Some(r#"{"all":true,"force":false}"#.into())
            )
        );
        assert_eq!(
            call(Request::Verify {
                models: Selection::Ids(vec!["a@1".into()]),
                report_only: true
            }),
            (
                "POST",
                "/verify".into(),
                Some(r#"{"ids":["a@1"],"report_only":true}"#.into())
            )
        );
        assert_eq!(
            call(Request::Pin {
                id: "odd/id?#".into(),
                pinned: false
            }),
            ("POST", "/models/odd%2Fid%3F%23/unpin".into(), None)
        );
        assert_eq!(
            call(Request::Overview),
            ("GET", "/health/models".into(), None)
        );
    }

    /// The per-model forms of the job routes read as the requests the bulk forms carry.
    #[test]
    fn per_model_routes_read_as_the_bulk_requests() {
        let wire = |query| Wire {
            id: "a@1".into(),
            query,
            body: b"",
            json: false,
        };
        let a = || Selection::Ids(vec!["a@1".into()]);
        assert_eq!(
            ENSURE_ONE.decode(&wire("force=true")).unwrap(),
            Request::Ensure {
                models: a(),
                force: true
            }
        );
        assert_eq!(
            VERIFY_ONE.decode(&wire("")).unwrap(),
            Request::Verify {
                models: a(),
                report_only: false
            }
        );
        assert_eq!(
            MARK_ONE.decode(&wire("")).unwrap(),
            Request::MarkCorrupted {
                ids: vec!["a@1".into()]
            }
        );
    }

    #[test]
    fn every_route_is_listed_once_and_used() {
        let mut listed = std::collections::HashSet::new();
        for r in ROUTES {
            assert!(listed.insert((r.method, r.path)), "{} twice", r.path);
        }
        let mut used: std::collections::HashSet<_> = every_request()
            .iter()
            .map(|r| serve(&r.call()).0)
            .map(|r| (r.method, r.path))
            .collect();
        for r in [ENSURE_ONE, VERIFY_ONE, MARK_ONE] {
            used.insert((r.method, r.path));
        }
        assert_eq!(listed, used);
    }

    #[test]
    fn refusals_say_what_was_wrong() {
        let read = |path: &str, query: &str, body: &str, json: bool| {
            let route = ROUTES.iter().find(|r| r.path == path).expect("route");
            let wire = Wire {
                id: "a@1".into(),
                query,
                body: body.as_bytes(),
                json,
            };
            route
                .decode(&wire)
                .map_err(|e| (e.http_status(), e.to_string()))
        };
        let (status, why) = read("/gc", "mode=aggressive&dryrun=true", "", true).unwrap_err();
        assert_eq!(status, 400);
        assert_eq!(
            why,
            "Failed to deserialize query string: dryrun: unknown field `dryrun`, expected `mode` or `dry_run`"
        );
        let (status, why) = read("/ensure", "", r#"{"idz": []}"#, true).unwrap_err();
        assert_eq!(status, 400);
        assert!(
            why.starts_with(
                "request body: unknown field `idz`, expected one of `ids`, `all`, `force`"
            ),
            "{why}"
        );
        assert_eq!(
            read("/ensure", "", r#"{"ids": ["a@1"]}"#, false)
                .unwrap_err()
                .0,
            415
        );
        let (status, why) = read("/ensure", "", "", true).unwrap_err();
        assert_eq!(status, 400);
        assert!(why.contains("(fields: ids, all, force)"), "{why}");
        let (status, why) = read("/gc", "mode=everything", "", true).unwrap_err();
        assert_eq!(status, 400);
        assert!(why.contains("unknown gc mode"), "{why}");
        assert_eq!(read("/events", "limit=many", "", true).unwrap_err().0, 400);
        assert_eq!(
            read("/models/{id}/pin", "", r#"{"force": true}"#, true)
                .unwrap_err()
                .0,
            400
        );
        // A GET reads no body.
        assert_eq!(read("/models", "", "not json", false), Ok(Request::Models));
    }
}
