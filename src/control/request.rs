//! The control vocabulary as data: every operation an operator can ask of the daemon is one arm
//! of [`Request`], answered by one [`Response`] from [`Control::handle`], whichever front end
//! asked: the HTTP endpoint (`http/`), `wan models` (`cmd.rs`: over HTTP, or in process when no
//! daemon runs) and the `.wan/` control files (`fs/control_files.rs`). Checks that belong to the
//! operation (ids, modes, busy models) happen once, behind `handle`. How a request travels over
//! HTTP is [`super::routes`]'s.
//!
//! # Adding an operation
//!
//! 1. An arm in [`Request`] (and one in [`Response`] if its answer is new).
//! 2. Its handler: the arm of [`Control::handle`] that calls the `Control` method doing it.
//! 3. Its route: a `const` `Route` listed in `routes::ROUTES`, and the arm of `Request::call`
//!    (routes.rs) that writes the request for it.
//!
//! `handle`, `call` and [`Request::model_ids`] match exhaustively, so the compiler asks for 2 and
//! 3; routes.rs's test `every_request_comes_back_from_its_route` checks the route reads back what
//! `call` wrote, once the new request is in `every_request` (below; a test asks for it). HTTP
//! and the in-process CLI then have it; a `.wan/` file (fs/tree.rs, fs/control_files.rs) or a
//! `wan models` command (cli.rs, cmd.rs) is a choice, not a must.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{
    Control, ControlError, DailyReport, GcMode, GcReport, Health, HealthStatus, ModelStatus,
    StorageReport, Summary,
};
use crate::manifest::ModelId;
use crate::store::index::Event;

/// One operation asked of the control plane. Its model ids are strings as asked, not
/// [`ModelId`]s: an id that is not in force (mistyped, or not an id at all) must reach
/// [`Control::resolve`] to be refused with a "did you mean"; what comes back names
/// [`ModelId`]s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// The daemon's health. `check_mount` is false where the mount is known to answer: a read
    /// of `.wan/health` (checking it would be a FUSE request to ourselves).
    Health { check_mount: bool },
    /// Every model's status by id, with a count of each state.
    Overview,
    /// Every model's status, in id order.
    Models,
    /// One model's status.
    Model { id: String },
    /// The configuration in force, secrets masked.
    Config,
    /// The Prometheus metrics text.
    Metrics,
    /// The last `limit` events, oldest first.
    Events { limit: usize },
    /// Events per UTC day over the last `days`.
    ReportDaily { days: u64 },
    /// Storage use per day over the last `days`, and now.
    ReportStorage { days: u64 },
    /// Starts an ensure job per model (one already ensuring is left to its job); `force` drops
    /// the cached data first.
    Ensure { models: Selection, force: bool },
    /// Starts a verify job per model; `report_only` repairs nothing.
    Verify {
        models: Selection,
        report_only: bool,
    },
    /// Runs one GC to its end.
    Gc { mode: GcMode, dry_run: bool },
    /// Pins or unpins a model (persisted; overrides the manifest).
    Pin { id: String, pinned: bool },
    /// Drops a model's cached data, except blobs a pinned model also lists.
    Evict { id: String },
    /// Marks models corrupt and drops their cached data.
    MarkCorrupted { ids: Vec<String> },
}

/// The models a job request names: every model, said outright, or these ids. An empty list
/// is refused, never read as every model: a script whose variable came out empty must not
/// start work on the whole manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Selection {
    All,
    Ids(Vec<String>),
}

/// The answer to a [`Request`]. It serializes as its content alone (`untagged`): the JSON body
/// HTTP sends, and what `wan models --json` prints.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Response {
    Health(Health),
    Overview(Overview),
    Models(Vec<ModelStatus>),
    Model(Box<ModelStatus>),
    Config(serde_json::Value),
    /// Prometheus text, not JSON: HTTP sends it as `text/plain`.
    Metrics(String),
    Events(Vec<Event>),
    Daily(DailyReport),
    Storage(StorageReport),
    /// Jobs started (HTTP 202: poll the models' status for their end).
    Started(Started),
    Gc(GcReport),
    Evicted(Evicted),
    Marked(Marked),
}

impl Response {
    /// HTTP status of this answer.
    pub fn http_status(&self) -> u16 {
        match self {
            // So a load balancer or systemd can act on it.
            Response::Health(h) if h.status == HealthStatus::Unhealthy => 503,
            Response::Started(_) => 202,
            Response::Health(_)
            | Response::Overview(_)
            | Response::Models(_)
            | Response::Model(_)
            | Response::Config(_)
            | Response::Metrics(_)
            | Response::Events(_)
            | Response::Daily(_)
            | Response::Storage(_)
            | Response::Gc(_)
            | Response::Evicted(_)
            | Response::Marked(_) => 200,
        }
    }
}

/// `{"summary": {...}, "models": {ID: status}}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Overview {
    pub summary: Summary,
    pub models: BTreeMap<ModelId, ModelStatus>,
}

/// The models whose jobs were started (or left running: a second ensure).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Started {
    pub started: Vec<ModelId>,
}

/// A model's data dropped: the id as asked, and the bytes freed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Evicted {
    pub evicted: String,
    pub freed_bytes: u64,
}

/// The models marked corrupted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Marked {
    pub marked: Vec<ModelId>,
}

impl Request {
    /// The events shown when a request does not say how many (`GET /events`, `.wan/events`).
    pub const EVENTS_LIMIT: usize = 200;
    /// The days of the daily report when a request does not say (the last 24 hours).
    pub const DAILY_DAYS: u64 = 1;
    /// The days of the storage report when a request does not say.
    pub const STORAGE_DAYS: u64 = 30;

    /// The model ids the request names (none for a request about every model, or none): what
    /// a front end checks before acting on several requests as one command.
    pub fn model_ids(&self) -> &[String] {
        match self {
            Request::Model { id } | Request::Pin { id, .. } | Request::Evict { id } => {
                std::slice::from_ref(id)
            }
            Request::Ensure {
                models: Selection::Ids(ids),
                ..
            }
            | Request::Verify {
                models: Selection::Ids(ids),
                ..
            }
            | Request::MarkCorrupted { ids } => ids,
            Request::Ensure {
                models: Selection::All,
                ..
            }
            | Request::Verify {
                models: Selection::All,
                ..
            }
            | Request::Health { .. }
            | Request::Overview
            | Request::Models
            | Request::Config
            | Request::Metrics
            | Request::Events { .. }
            | Request::ReportDaily { .. }
            | Request::ReportStorage { .. }
            | Request::Gc { .. } => &[],
        }
    }
}

impl Control {
    /// Answers one request: the one place each operation is dispatched to the method doing it.
    pub async fn handle(self: &Arc<Self>, request: Request) -> Result<Response, ControlError> {
        Ok(match request {
            Request::Health { check_mount } => Response::Health(self.health(check_mount).await),
            Request::Overview => {
                let models = self.status(&[])?;
                Response::Overview(Overview {
                    summary: self.summary(&models),
                    models: models.into_iter().map(|m| (m.id.clone(), m)).collect(),
                })
            }
            Request::Models => Response::Models(self.status(&[])?),
            Request::Model { id } => {
                Response::Model(Box::new(self.model_status(&self.resolve(&[id])?[0])?))
            }
            Request::Config => Response::Config(self.config_view()),
            Request::Metrics => {
                self.usage();
                self.count_untrusted();
                Response::Metrics(crate::metrics::render())
            }
            Request::Events { limit } => Response::Events(self.events(limit)?),
            Request::ReportDaily { days } => Response::Daily(self.report_daily(days)?),
            Request::ReportStorage { days } => Response::Storage(self.report_storage(days)?),
            Request::Ensure { models, force } => Response::Started(Started {
                started: self.ensure(&self.selected(models)?, force)?,
            }),
            Request::Verify {
                models,
                report_only,
            } => Response::Started(Started {
                started: self.verify(&self.selected(models)?, report_only)?,
            }),
            Request::Gc { mode, dry_run } => Response::Gc(self.gc(mode, dry_run).await?),
            Request::Pin { id, pinned } => Response::Model(Box::new(self.set_pinned(&id, pinned)?)),
            Request::Evict { id } => {
                let freed_bytes = self.evict(&id, false)?;
                Response::Evicted(Evicted {
                    evicted: id,
                    freed_bytes,
                })
            }
            Request::MarkCorrupted { ids } => {
                // Every model at once would drop the whole cache: GC aggressive does that.
                if ids.is_empty() {
                    return Err(no_model());
                }
                Response::Marked(Marked {
                    marked: self.mark_corrupted(&ids)?,
                })
            }
        })
    }

    /// The ids of a selection; the control functions read an empty list as every model, so
    /// one is refused here.
    fn selected(&self, models: Selection) -> Result<Vec<ModelId>, ControlError> {
        match models {
            Selection::All => Ok(self.model_ids()),
            Selection::Ids(ids) if ids.is_empty() => Err(no_model()),
            Selection::Ids(ids) => self.resolve(&ids),
        }
    }
}

fn no_model() -> ControlError {
    ControlError::BadRequest("the request names no model".into())
}

/// One request of every kind, each form of a selection included: what the tests of the
/// vocabulary and of its routes go through.
#[cfg(test)]
pub(crate) fn every_request() -> Vec<Request> {
    let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    vec![
        Request::Health { check_mount: true },
        Request::Overview,
        Request::Models,
        Request::Model {
            id: "t2v-A14B@2.2.0".into(),
        },
        Request::Config,
        Request::Metrics,
        Request::Events { limit: 5 },
        Request::ReportDaily { days: 1 },
        Request::ReportStorage { days: 30 },
        Request::Ensure {
            models: Selection::All,
            force: true,
        },
        Request::Ensure {
            models: Selection::Ids(ids(&["a@1", "b@2"])),
            force: false,
        },
        Request::Verify {
            models: Selection::All,
            report_only: false,
        },
        Request::Verify {
            models: Selection::Ids(ids(&["a@1"])),
            report_only: true,
        },
        Request::Gc {
            mode: GcMode::DeepClean,
            dry_run: true,
        },
        Request::Pin {
            id: "a/b?c#d".into(),
            pinned: true,
        },
        Request::Pin {
            id: "a@1".into(),
            pinned: false,
        },
        Request::Evict { id: "a@1".into() },
        Request::MarkCorrupted {
            ids: ids(&["a@1", "b@2"]),
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `every_request` has an example of every arm: a new arm breaks this match, and once it is
    /// numbered the test asks for its example.
    #[test]
    fn every_request_has_every_arm() {
        const ARMS: usize = 15;
        let arm = |r: &Request| match r {
            Request::Health { .. } => 0,
            Request::Overview => 1,
            Request::Models => 2,
            Request::Model { .. } => 3,
            Request::Config => 4,
            Request::Metrics => 5,
            Request::Events { .. } => 6,
            Request::ReportDaily { .. } => 7,
            Request::ReportStorage { .. } => 8,
            Request::Ensure { .. } => 9,
            Request::Verify { .. } => 10,
            Request::Gc { .. } => 11,
            Request::Pin { .. } => 12,
            Request::Evict { .. } => 13,
            Request::MarkCorrupted { .. } => 14,
        };
        let seen: std::collections::BTreeSet<usize> = every_request().iter().map(arm).collect();
        assert_eq!(seen, (0..ARMS).collect());
    }

    /// In process, a request is data: it writes and reads back as JSON, tagged by `op`.
    #[test]
    fn requests_serialize_tagged_by_op() {
        for request in every_request() {
            let json = serde_json::to_value(&request).unwrap();
            assert!(json["op"].is_string(), "{json}");
            assert_eq!(serde_json::from_value::<Request>(json).unwrap(), request);
        }
        assert_eq!(
            serde_json::to_value(Request::Gc {
                mode: GcMode::DeepClean,
                dry_run: false
            })
            .unwrap(),
            serde_json::json!({"op": "gc", "mode": "deep-clean", "dry_run": false})
        );
        assert!(
            serde_json::from_value::<Request>(
                serde_json::json!({"op": "evict", "id": "a", "force": true})
            )
            .is_err()
        );
    }
}
