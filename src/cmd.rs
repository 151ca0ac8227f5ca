//! The `wan models` commands. Each asks [`Request`]s of the running daemon over its HTTP
//! endpoint (written by the control route table, with the bearer token of `http.token_env` when
//! set); when no daemon answers, it opens the cache itself (under the cache lock) and has
//! [`Control::handle`] answer the same requests in process, so the logic exists once. A failure
//! says which address was tried and why the cache could not be opened. What is here is the
//! command line's own: which requests a command makes, and how their answers are printed.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::config::Config;
use crate::control::request::{Marked, Started};
use crate::control::routes::{Call, Method};
use crate::control::{
    Control, ControlError, DailyReport, GcMode, GcReport, JobKind, JobState, JobStatus, ModelState,
    ModelStatus, Request, Selection, StorageReport,
};
use crate::daemon::Services;
use crate::manifest::{Manifest, ModelId};
use crate::store::StoreError;

/// What to operate on.
pub enum ModelsOp {
    Status {
        only: Vec<String>,
        critical_only: bool,
        failed_only: bool,
    },
    Ensure {
        sel: Selection,
        force: bool,
        benchmark: bool,
    },
    Verify {
        sel: Selection,
        report_only: bool,
    },
    Gc {
        mode: GcMode,
        dry_run: bool,
    },
    ReportDaily,
    ReportStorage {
        days: u64,
    },
    MarkCorrupted {
        ids: Vec<String>,
    },
    Pin {
        id: String,
        pinned: bool,
    },
    List,
}

/// Where the daemon and the cache are.
pub struct Target {
    pub http: String,
    pub manifest: std::path::PathBuf,
    pub cache_dir: std::path::PathBuf,
    pub config: Config,
}

/// Either the daemon over HTTP, or the cache opened directly.
enum Backend {
    Daemon {
        base: String,
        client: reqwest::Client,
        /// Added to a refusal for want of a token when the CLI sent none: which variable it
        /// read the token from.
        no_token: Option<String>,
    },
    Direct(Arc<Control>),
}

/// How long the CLI waits for the daemon's first answer before it calls it unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

impl Backend {
    async fn connect(t: &Target) -> anyhow::Result<Backend> {
        let no_daemon = if t.http.is_empty() {
            "no daemon address is set (http.addr is empty and no --http)".to_string()
        } else {
            let base = format!("http://{}", t.http);
            // The token of `http.token_env`, as the daemon reads it: under `require_token`
            // the daemon takes no mutation without it, from this host either.
            let env = &t.config.http.token_env;
            let token = std::env::var(env).ok().filter(|v| !v.is_empty());
            let mut headers = reqwest::header::HeaderMap::new();
            if let Some(token) = &token {
                let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
                    .with_context(|| format!("the token in ${env} is not a valid header value"))?;
                value.set_sensitive(true);
                headers.insert(reqwest::header::AUTHORIZATION, value);
            }
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(3600))
                .default_headers(headers)
                .build()?;
            match send(&client, &base, &Request::Overview.call())
                .timeout(CONNECT_TIMEOUT)
                .send()
                .await
            {
                // Any answer is a daemon: what it refuses, the command's own call will say.
                Ok(_) => {
                    return Ok(Backend::Daemon {
                        base,
                        client,
                        no_token: token.is_none().then(|| env.clone()),
                    });
                }
                Err(e) if e.is_connect() => {
                    format!("no daemon answered at {} ({})", t.http, root_cause(&e))
                }
                Err(e) => bail!(
                    "the daemon at {} did not answer: {}",
                    t.http,
                    root_cause(&e)
                ),
            }
        };
        let direct = Manifest::load(&t.manifest)
            .map_err(anyhow::Error::from)
            .and_then(|manifest| {
                Services::build(&manifest, &t.manifest, &t.cache_dir, &t.config, None)
            });
        match direct {
            Ok(services) => Ok(Backend::Direct(services.control)),
            Err(e) => match e.downcast_ref::<StoreError>() {
                Some(StoreError::Locked(dir)) => bail!(
                    "{no_daemon}, but cache {dir} is locked by a running wan daemon: its HTTP \
                     endpoint is not there (check --http / http.addr)"
                ),
                _ => Err(e.context(format!(
                    "{no_daemon}, and the cache could not be opened directly instead"
                ))),
            },
        }
    }

    /// Asks `request` and reads its answer as `T`: the daemon's JSON, or in process the same
    /// JSON made of [`Control::handle`]'s answer, so both backends print alike.
    async fn ask<T: DeserializeOwned>(&self, request: Request) -> anyhow::Result<T> {
        match self {
            Backend::Daemon {
                base,
                client,
                no_token,
            } => {
                let sent = send(client, base, &request.call()).send().await?;
                answer(sent, no_token.as_deref()).await
            }
            Backend::Direct(control) => {
                let answer = serde_json::to_value(control.handle(request).await?)?;
                Ok(serde_json::from_value(answer)?)
            }
        }
    }
}

/// `call` to the daemon at `base`, as the control route table wrote it.
fn send(client: &reqwest::Client, base: &str, call: &Call) -> reqwest::RequestBuilder {
    let method = match call.method {
        Method::Get => reqwest::Method::GET,
        Method::Post => reqwest::Method::POST,
    };
    let req = client.request(method, format!("{base}{}", call.target));
    match &call.body {
        Some(body) => req.json(body),
        None => req,
    }
}

/// What lies under a reqwest error: for a connection, the OS's reason ("Connection refused"),
/// not "error sending request for url".
fn root_cause(e: &reqwest::Error) -> String {
    let mut cause: &dyn std::error::Error = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// An error answer's `error` text, or what the body was, for a server that is not wanfs.
async fn error_text(resp: reqwest::Response) -> String {
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    match serde_json::from_str::<Value>(&body) {
        Ok(v) if v["error"].is_string() => v["error"].as_str().unwrap_or_default().to_string(),
        _ if body.trim().is_empty() => format!("HTTP {status}"),
        _ => format!("HTTP {status}: {}", crate::logging::untrusted(body.trim())),
    }
}

/// The daemon's answer as `T` (the control structs the daemon serialized), or its error. A
/// refusal for want of a token says where the CLI looks for one, when it had none to send.
async fn answer<T: DeserializeOwned>(
    resp: reqwest::Response,
    no_token: Option<&str>,
) -> anyhow::Result<T> {
    let status = resp.status();
    if !status.is_success() {
        let why = error_text(resp).await;
        match no_token {
            Some(env)
                if matches!(
                    status,
                    reqwest::StatusCode::FORBIDDEN | reqwest::StatusCode::UNAUTHORIZED
                ) =>
            {
                bail!("{why} (no token was sent: ${env} is not set in this environment)")
            }
            _ => bail!("{why}"),
        }
    }
    resp.json().await.context("the daemon's answer")
}

/// Runs one `wan models` command; prints JSON with `json`, else a human summary.
pub fn run(op: ModelsOp, target: Target, json_out: bool) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let backend = Backend::connect(&target).await?;
        run_op(&backend, op, json_out).await
    })
}

/// Prints `v` as pretty JSON with its keys sorted: through a `Value`, whose maps sort them, as
/// the CLI always has (a struct alone would print its fields in declaration order).
fn print_json(v: &impl Serialize) {
    let v = serde_json::to_value(v).unwrap_or_default();
    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
}

fn code(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

async fn statuses(b: &Backend) -> anyhow::Result<Vec<ModelStatus>> {
    b.ask(Request::Models).await
}

fn failed(m: &ModelStatus) -> bool {
    m.state == ModelState::Corrupt
        || m.state == ModelState::Untrusted
        || m.last_error.is_some()
        || m.job.as_ref().is_some_and(|j| j.state == JobState::Failed)
}

async fn run_op(b: &Backend, op: ModelsOp, json_out: bool) -> anyhow::Result<ExitCode> {
    match op {
        ModelsOp::Status {
            only,
            critical_only,
            failed_only,
        } => {
            let all = statuses(b).await?;
            for id in &only {
                if !all.iter().any(|m| m.id == id.as_str()) {
                    let known = all.iter().map(|m| m.id.as_str());
                    return Err(ControlError::unknown_model(id, known).into());
                }
            }
            let selected = all
                .into_iter()
                .filter(|m| only.is_empty() || only.iter().any(|o| m.id == o.as_str()));
            let (mut pinned_any, mut shown) = (false, Vec::new());
            for m in selected {
                pinned_any |= m.pinned;
                if (!critical_only || m.pinned) && (!failed_only || failed(&m)) {
                    shown.push(m);
                }
            }
            // "Every critical model is fine" must not pass because nothing is critical.
            let none_pinned = critical_only && !pinned_any;
            if none_pinned {
                eprintln!(
                    "no model is pinned{}: --critical-only has nothing to check (pin the critical models: pinned = true in the manifest, or `wan models pin ID`)",
                    if only.is_empty() { "" } else { " among --only" }
                );
            }
            let ok = !shown.iter().any(failed) && !none_pinned;
            if json_out {
                print_json(&shown);
            } else {
                println!(
                    "{:<28} {:<12} {:>22} {:>6}  {:<14} {:<24} ERROR",
                    "MODEL", "STATE", "CACHED / TOTAL", "PINNED", "LAST ACCESS", "SIGNED BY"
                );
                for m in &shown {
                    let signed = match (&m.trust.signed_by, m.trust.state.as_str()) {
                        (Some(s), _) => s.clone(),
                        (None, "") => "-".into(),
                        (None, state) => state.into(),
                    };
                    let refused = m
                        .trust
                        .reason
                        .as_ref()
                        .map(|r| format!("{r}: {}", m.trust.detail.as_deref().unwrap_or("")));
                    println!(
                        "{:<28} {:<12} {:>22} {:>6}  {:<14} {:<24} {}",
                        m.id,
                        m.state,
                        format!("{} / {}", human(m.bytes_cached), human(m.bytes_total)),
                        if m.pinned { "yes" } else { "no" },
                        ago(m.last_access),
                        signed,
                        refused.as_deref().or(m.last_error.as_deref()).unwrap_or("")
                    );
                    for p in &m.packed {
                        println!("  packed: {p}");
                    }
                }
            }
            Ok(code(ok))
        }
        ModelsOp::List => {
            let all = statuses(b).await?;
            if json_out {
                print_json(&all.iter().map(|m| json!({"id": m.id, "description": m.description, "pinned": m.pinned, "bytes_total": m.bytes_total})).collect::<Vec<_>>());
            } else {
                for m in &all {
                    println!(
                        "{:<28} {:>10}  {}{}",
                        m.id,
                        human(m.bytes_total),
                        m.description,
                        if m.pinned { "  [pinned]" } else { "" }
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        ModelsOp::Ensure {
            sel,
            force,
            benchmark,
        } => run_jobs(b, JobKind::Ensure, sel, force, false, benchmark, json_out).await,
        ModelsOp::Verify { sel, report_only } => {
            run_jobs(b, JobKind::Verify, sel, false, report_only, false, json_out).await
        }
        ModelsOp::Gc { mode, dry_run } => {
            let report: GcReport = b.ask(Request::Gc { mode, dry_run }).await?;
            if json_out {
                print_json(&report);
            } else {
                let verb = if dry_run { "would remove" } else { "removed" };
                for item in &report.removed {
                    println!(
                        "{verb} {} ({}) {}",
                        &item.blob[..12.min(item.blob.len())],
                        human(item.bytes),
                        item.files.join(", ")
                    );
                }
                println!(
                    "gc {}{}: {verb} {} blobs, {} freed; {} orphans; usage {} -> {}",
                    report.mode.as_str(),
                    if dry_run { " (dry run)" } else { "" },
                    report.removed.len(),
                    human(report.freed_bytes),
                    report.orphans_removed,
                    human(report.used_before),
                    human(report.used_after),
                );
            }
            Ok(code(report.bad_chunks == 0))
        }
        ModelsOp::ReportDaily => {
            let report: DailyReport = b
                .ask(Request::ReportDaily {
                    days: Request::DAILY_DAYS,
                })
                .await?;
            if json_out {
                print_json(&report);
            } else {
                print_daily(&report);
            }
            Ok(ExitCode::SUCCESS)
        }
        ModelsOp::ReportStorage { days } => {
            let report: StorageReport = b.ask(Request::ReportStorage { days }).await?;
            if json_out {
                print_json(&report);
            } else {
                print_storage(&report);
            }
            Ok(ExitCode::SUCCESS)
        }
        ModelsOp::MarkCorrupted { ids } => {
            let marked: Marked = b.ask(Request::MarkCorrupted { ids: ids.clone() }).await?;
            if json_out {
                print_json(&marked)
            } else {
                println!("marked corrupted (cached data dropped): {}", ids.join(", "))
            }
            Ok(ExitCode::SUCCESS)
        }
        ModelsOp::Pin { id, pinned } => {
            let v: ModelStatus = b
                .ask(Request::Pin {
                    id: id.clone(),
                    pinned,
                })
                .await?;
            if json_out {
                print_json(&v)
            } else {
                println!("{id}: pinned = {}", v.pinned)
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Starts ensure or verify jobs and waits for them, with progress on a terminal.
async fn run_jobs(
    b: &Backend,
    kind: JobKind,
    sel: Selection,
    force: bool,
    report_only: bool,
    benchmark: bool,
    json_out: bool,
) -> anyhow::Result<ExitCode> {
    let t0 = Instant::now();
    // Started in the background (in process too), then followed like any client would.
    let request = match kind {
        JobKind::Ensure => Request::Ensure { models: sel, force },
        JobKind::Verify => Request::Verify {
            models: sel,
            report_only,
        },
    };
    let Started { started: ids } = b.ask(request).await?;
    let mut progress = Progress::new(kind, &ids);
    let results = loop {
        tokio::time::sleep(Duration::from_millis(if benchmark { 20 } else { 200 })).await;
        let all = statuses(b).await?;
        let mine: Vec<ModelStatus> = all.into_iter().filter(|m| ids.contains(&m.id)).collect();
        let running = mine.iter().any(|m| match &m.job {
            None => true,
            Some(j) => j.kind != kind || j.state == JobState::Running,
        });
        progress.show(&mine, !running);
        if !running {
            break mine;
        }
    };
    let secs = t0.elapsed().as_secs_f64();
    let ok = results.iter().all(|m| {
        m.job.as_ref().is_some_and(|j| j.state == JobState::Done)
            && !(kind == JobKind::Verify && m.state == ModelState::Corrupt)
    });
    // What the daemon measured: bytes its jobs fetched and stored, and when the first landed.
    // Cached bytes are not a download rate, and the CLI's own polling is not a first byte.
    let fetched: u64 = results
        .iter()
        .filter_map(|m| m.job.as_ref())
        .map(|j| j.bytes_fetched)
        .sum();
    let first_byte = results
        .iter()
        .filter_map(|m| m.job.as_ref()?.first_fetch_secs)
        .reduce(f64::min);
    let rate = (fetched > 0).then(|| fetched as f64 / 1e6 / secs.max(1e-9));
    let nothing = if ok {
        "nothing fetched: already cached"
    } else {
        "nothing fetched"
    };
    if json_out {
        let mut v = json!({"models": results, "seconds": secs});
        if benchmark {
            v["benchmark"] = json!({"bytes_fetched": fetched, "seconds": secs, "mb_per_s": rate,
                "time_to_first_byte_s": first_byte});
            if fetched == 0 {
                v["benchmark"]["note"] = json!(nothing);
            }
        }
        print_json(&v);
    } else {
        for m in &results {
            // Every job has ended here (the loop waits for it), so `job` is set.
            let j = m.job.as_ref();
            println!(
                "{:<28} {:<12} {kind} {}{}{}",
                m.id,
                m.state,
                j.map_or("", |j| j.state.as_str()),
                if kind == JobKind::Verify {
                    format!(", {} corrupt chunks", j.map_or(0, |j| j.bad_chunks))
                } else {
                    String::new()
                },
                j.and_then(|j| j.error.as_deref())
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            );
        }
        match rate {
            _ if !benchmark => {}
            None => println!("benchmark: {nothing} (in {secs:.2} s)"),
            Some(rate) => println!(
                "benchmark: fetched {} in {secs:.2} s = {rate:.1} MB/s, time to first byte {}",
                human(fetched),
                first_byte
                    .map(|t| format!("{t:.3} s"))
                    .unwrap_or_else(|| "n/a".into())
            ),
        }
    }
    Ok(code(ok))
}

/// `wan models report --daily` as a table: one row per UTC day and kind of event.
fn print_daily(report: &DailyReport) {
    println!(
        "{:<12} {:<28} {:>7} {:>12}",
        "DAY", "EVENT", "COUNT", "BYTES"
    );
    if report.days.is_empty() {
        println!("(no events in the period)");
    }
    for (day, kinds) in &report.days {
        for (kind, t) in kinds {
            println!("{day:<12} {kind:<28} {:>7} {:>12}", t.count, human(t.bytes));
        }
    }
}

/// `wan models report --storage` as tables: now (in total and per model), then per day.
fn print_storage(report: &StorageReport) {
    let cur = &report.current;
    let cap = cur.capacity_bytes;
    println!(
        "now: {} used{}, {:.1} % of the filesystem free",
        human(cur.used_bytes),
        if cap > 0 {
            format!(" of {}", human(cap))
        } else {
            String::new()
        },
        cur.free_percent
    );
    println!("\n{:<28} {:>12}", "MODEL", "CACHED");
    for (id, bytes) in &cur.per_model {
        println!("{id:<28} {:>12}", human(*bytes));
    }
    println!(
        "\n{:<12} {:>12} {:>12} {:>12}",
        "DAY", "MIN USED", "MAX USED", "CAPACITY"
    );
    if report.days.is_empty() {
        println!("(no samples yet: one is taken every hour)");
    }
    for (day, d) in &report.days {
        println!(
            "{day:<12} {:>12} {:>12} {:>12}",
            human(d.min_used),
            human(d.max_used),
            human(d.capacity)
        );
    }
}

/// Per-model progress of ensure/verify jobs on stderr: a bar per model (bytes, rate, ETA) on
/// a terminal; otherwise one plain line per model every few seconds, and once at the end, so a
/// log or CI job shows that a long ensure is moving without a screenful of escape codes.
struct Progress {
    kind: JobKind,
    bars: Option<(
        indicatif::MultiProgress,
        BTreeMap<ModelId, indicatif::ProgressBar>,
    )>,
    last_line: Option<Instant>,
}

/// Between two plain progress lines of one model.
const PLAIN_EVERY: Duration = Duration::from_secs(5);

impl Progress {
    fn new(kind: JobKind, ids: &[ModelId]) -> Progress {
        let bars = std::io::stderr().is_terminal().then(|| {
            let multi = indicatif::MultiProgress::new();
            let style = indicatif::ProgressStyle::with_template(
                "{prefix:<28} [{bar:30}] {bytes:>10}/{total_bytes:<10} {bytes_per_sec:>12} ETA {eta:>4} {msg}",
            )
            .expect("valid template")
            .progress_chars("=> ");
            let bars = ids
                .iter()
                .map(|id| {
                    let bar = multi.add(indicatif::ProgressBar::new(0));
                    bar.set_style(style.clone());
                    bar.set_prefix(format!("{kind} {id}"));
                    (id.clone(), bar)
                })
                .collect();
            (multi, bars)
        });
        Progress {
            kind,
            bars,
            last_line: None,
        }
    }

    fn show(&mut self, models: &[ModelStatus], last: bool) {
        match &self.bars {
            Some((_, bars)) => {
                for m in models {
                    let Some(bar) = bars.get(&m.id) else { continue };
                    let j = m.job.as_ref();
                    let (done, total) = progress(j);
                    bar.set_length(total);
                    bar.set_position(done);
                    if let Some(j) = j.filter(|j| j.state != JobState::Running) {
                        bar.finish_with_message(j.state.as_str());
                    }
                }
                if last {
                    bars.values().for_each(indicatif::ProgressBar::finish);
                }
            }
            None => {
                let due = self.last_line.is_none_or(|t| t.elapsed() >= PLAIN_EVERY);
                if !(due || last) {
                    return;
                }
                self.last_line = Some(Instant::now());
                for m in models {
                    eprintln!("{}", plain_line(self.kind, m));
                }
            }
        }
    }
}

/// (bytes done, bytes in all) of a job, as its progress shows them. A job that is done is all
/// done: a verify checks only what is cached, and a file identical to one it checked once, so
/// its `bytes_done` can end short of `bytes_total` (a COMPLETE model with two identical
/// configs read 99 % done).
fn progress(j: Option<&JobStatus>) -> (u64, u64) {
    let total = j.map_or(0, |j| j.bytes_total);
    match j {
        Some(j) if j.state == JobState::Done => (total, total),
        _ => (j.map_or(0, |j| j.bytes_done), total),
    }
}

/// `ensure t2v-A14B@2.2.0: 45% 1.2 GiB / 2.7 GiB, 118.0 MiB/s, ETA 13 s (running)`
fn plain_line(kind: JobKind, m: &ModelStatus) -> String {
    let j: Option<&JobStatus> = m.job.as_ref();
    let (done, total) = progress(j);
    let pct = (done * 100).checked_div(total).unwrap_or(100);
    let mut line = format!("{kind} {}: {pct}% {} / {}", m.id, human(done), human(total));
    if let Some(rate) = j.and_then(|j| j.rate_bytes_per_s).filter(|r| *r > 0.0) {
        line.push_str(&format!(", {}/s", human(rate as u64)));
    }
    if let Some(eta) = j.and_then(|j| j.eta_secs) {
        line.push_str(&format!(", ETA {}", duration(eta)));
    }
    line.push_str(&format!(
        " ({})",
        j.map_or("starting", |j| j.state.as_str())
    ));
    line
}

/// A duration for people: `45 s`, `3 min`, `2 h 5 min`, `3 d 4 h`.
pub fn duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min", s / 60),
        3600..86400 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        _ => format!("{} d {} h", s / 86400, s % 86400 / 3600),
    }
}

/// How long ago a unix time was: `12 s ago`, `3 min ago`, … (`-` for none).
pub fn ago(ts: Option<u64>) -> String {
    match ts {
        None | Some(0) => "-".into(),
        Some(t) => {
            let now = crate::store::now_secs();
            format!("{} ago", duration(now.saturating_sub(t) as f64))
        }
    }
}

fn human(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Reads a model list file: one id per line, `#` comments and blank lines ignored.
pub fn read_model_list(path: &std::path::Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading model list {}", path.display()))?;
    Ok(text
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect())
}

/// Splits `--only a,b --only c` into ids.
pub fn split_ids(only: &[String]) -> Vec<String> {
    only.iter()
        .flat_map(|s| s.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}
