//! Scheduled jobs (`/jobs/v2`): a direct method or a twin update broadcast to every device
//! matching a query condition, from a start time, within a maximum execution time. Each job
//! has a runner task; device operations go out with a bounded number in flight per job and
//! across all jobs (interactive calls never wait behind jobs). Jobs and per-device records
//! are persisted, so a restart resumes a job with the devices it had not finished.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use twinhub_proto::error::ErrorCode;
use twinhub_proto::model::{DeviceJobStatistics, JobRequest, JobResponse};
use twinhub_proto::time::{format_timestamp, parse_timestamp};
use twinhub_query::Expr;
use twinhub_store::{Table, Write};

use crate::error::{Error, Result};
use crate::hub::Hub;
use crate::hub_events::JobStep;
use crate::keys;
use crate::methods::MethodCall;
use crate::record::DeviceRecord;

pub const METHOD_JOB: &str = "scheduleDeviceMethod";
pub const TWIN_JOB: &str = "scheduleUpdateTwin";
/// Device operations one job has in flight.
const PER_JOB_IN_FLIGHT: usize = 64;
/// Device operations all jobs together have in flight.
const ALL_JOBS_IN_FLIGHT: usize = 256;
/// How often a running job's statistics are saved.
const STATS_EVERY: Duration = Duration::from_millis(500);
const DEFAULT_MAX_EXECUTION: i64 = 3600;
/// The longest `maxExecutionTimeInSeconds` accepted: 30 days, as long as IoT Hub keeps a
/// job's history (it documents no maximum of its own).
pub const MAX_EXECUTION: i64 = 30 * 86_400;
/// Jobs not yet finished (scheduled, queued or running) at one time.
pub const MAX_ACTIVE_JOBS: usize = 100;
/// How long a finished job (and its per-device records) is kept, as IoT Hub does.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(30 * 86_400);
/// How often finished jobs past their retention are removed.
const RETENTION_SWEEP_EVERY: Duration = Duration::from_secs(3600);
/// Default and largest page of `GET /jobs/v2/query`.
pub const DEFAULT_JOB_PAGE: usize = 100;
pub const MAX_JOB_PAGE: usize = 1000;

/// The stored form of a job.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredJob {
    job: JobResponse,
    /// The target devices have been resolved and their records written.
    targets_resolved: bool,
}

/// One device's part in a job, as `SELECT * FROM devices.jobs` returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceJob {
    pub device_id: String,
    pub job_id: String,
    pub job_type: String,
    /// `pending`, `running`, `completed`, `failed` or `cancelled`.
    pub status: String,
    pub start_time_utc: Option<String>,
    pub end_time_utc: Option<String>,
    pub created_date_time_utc: String,
    pub last_updated_date_time_utc: String,
    pub outcome: Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<Value>,
}

fn device_job_key(job_id: &str, device_id: &str) -> String {
    format!("{job_id}/{device_id}")
}

fn is_terminal(status: &str) -> bool {
    matches!(status, "completed" | "failed" | "cancelled")
}

fn job_not_found(job_id: &str) -> Error {
    Error::new(
        ErrorCode::JobNotFound,
        format!("Job '{job_id}' does not exist"),
    )
}

/// Running jobs' cancel switches, the shutdown switch, and the shared in-flight budget.
pub(crate) struct JobsState {
    cancels: Mutex<HashMap<String, watch::Sender<bool>>>,
    /// Finished jobs older than this are removed.
    pub(crate) retention: Duration,
    /// Set when the hub stops: runners stop without recording anything, so the devices they
    /// had not finished stay pending and the job resumes at the next start.
    pub(crate) suspend: watch::Sender<bool>,
    /// Whether this hub runs jobs: always on a single node; in a cluster, while it holds the
    /// jobs lease (`jobs_leader`). Runners stop without recording anything when it turns off.
    pub(crate) leading: watch::Sender<bool>,
    budget: Arc<Semaphore>,
}

impl Default for JobsState {
    fn default() -> Self {
        JobsState {
            cancels: Mutex::new(HashMap::new()),
            retention: DEFAULT_RETENTION,
            suspend: watch::channel(false).0,
            leading: watch::channel(true).0,
            budget: Arc::new(Semaphore::new(ALL_JOBS_IN_FLIGHT)),
        }
    }
}

/// The validated operation a job applies to each device.
#[derive(Clone)]
enum Operation {
    Method(MethodCall),
    Twin(Value),
}

/// Parses a job's `queryCondition` (`*` or a WHERE condition).
fn parse_condition(text: &str) -> Result<Option<Expr>> {
    let t = text.trim();
    if t == "*" || t.is_empty() {
        return Ok(None);
    }
    twinhub_query::parse_condition(t)
        .map(Some)
        .map_err(|e| Error::invalid(format!("Invalid queryCondition: {e}")))
}

fn operation(job: &JobResponse) -> Result<Operation> {
    match job.job_type.as_str() {
        METHOD_JOB => {
            let m = job.cloud_to_device_method.as_ref().ok_or_else(|| {
                Error::invalid("A scheduleDeviceMethod job needs cloudToDeviceMethod")
            })?;
            Ok(Operation::Method(MethodCall::from_request(m)?))
        }
        TWIN_JOB => {
            let twin = job
                .update_twin
                .as_ref()
                .ok_or_else(|| Error::invalid("A scheduleUpdateTwin job needs updateTwin"))?;
            let mut body = serde_json::Map::new();
            if let Some(tags) = &twin.tags {
                body.insert("tags".into(), Value::Object(tags.clone()));
            }
            if let Some(props) = &twin.properties
                && !props.desired.is_empty()
            {
                body.insert("properties".into(), json!({ "desired": props.desired }));
            }
            if body.is_empty() {
                return Err(Error::invalid(
                    "updateTwin must carry tags or desired properties",
                ));
            }
            let body = Value::Object(body);
            crate::twins::check_twin_input(&body)?;
            Ok(Operation::Twin(body))
        }
        other => Err(Error::invalid(format!(
            "Job type '{other}' is not supported (use {METHOD_JOB} or {TWIN_JOB})"
        ))),
    }
}

impl Hub {
    /// `PUT /jobs/v2/{id}`: validates and stores the job, then starts its runner.
    pub async fn create_job(
        self: &Arc<Self>,
        job_id: &str,
        req: &JobRequest,
    ) -> Result<JobResponse> {
        twinhub_proto::ids::validate_device_id(job_id)
            .map_err(|e| Error::invalid(format!("Invalid job id: {e}")))?;
        if !req.job_id.is_empty() && req.job_id != job_id {
            return Err(Error::invalid(
                "The jobId in the body does not match the path",
            ));
        }
        let condition = req
            .query_condition
            .clone()
            .ok_or_else(|| Error::invalid("queryCondition is required"))?;
        parse_condition(&condition)?;
        let now = jiff::Timestamp::now();
        let start = match &req.start_time {
            Some(t) => parse_timestamp(t).ok_or_else(|| {
                Error::invalid(format!("startTime '{t}' is not an RFC 3339 time"))
            })?,
            None => now,
        };
        let max = req
            .max_execution_time_in_seconds
            .unwrap_or(DEFAULT_MAX_EXECUTION);
        if !(1..=MAX_EXECUTION).contains(&max) {
            return Err(Error::invalid(format!(
                "maxExecutionTimeInSeconds must be between 1 and {MAX_EXECUTION}"
            )));
        }
        let job = JobResponse {
            job_id: job_id.to_string(),
            query_condition: Some(condition),
            created_time: Some(format_timestamp(now)),
            start_time: Some(format_timestamp(start)),
            end_time: None,
            max_execution_time_in_seconds: Some(max),
            job_type: req.job_type.clone(),
            cloud_to_device_method: req.cloud_to_device_method.clone(),
            update_twin: req.update_twin.clone(),
            status: if start > now { "scheduled" } else { "queued" }.to_string(),
            failure_reason: None,
            status_message: None,
            device_job_statistics: Some(DeviceJobStatistics::default()),
        };
        operation(&job)?;
        let _guard = self.locks.lock(&format!("job/{job_id}")).await;
        if self.store.get(Table::Jobs, job_id).await?.is_some() {
            return Err(Error::new(
                ErrorCode::InvalidOperation,
                format!("A job with id '{job_id}' already exists"),
            ));
        }
        let active = self
            .jobs
            .cancels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len();
        if active >= MAX_ACTIVE_JOBS {
            return Err(Error::new(
                ErrorCode::ThrottlingMaxActiveJobCountExceeded,
                format!("At most {MAX_ACTIVE_JOBS} jobs may be scheduled or running at once"),
            ));
        }
        self.save_job(&StoredJob {
            job: job.clone(),
            targets_resolved: false,
        })
        .await?;
        // Before the runner starts, so `jobCreated` always precedes the job's end.
        self.emit(self.job_event(&job, JobStep::Created)).await;
        if *self.jobs.leading.borrow() {
            self.spawn_job(job_id.to_string());
        } else if let Some(bus) = self.cluster() {
            // The leader also finds it when it next looks over the unfinished jobs.
            let notice = crate::cluster::Notice::JobCreated {
                job_id: job_id.to_owned(),
            };
            bus.broadcast(&notice).await;
        }
        Ok(job)
    }

    /// `GET /jobs/v2/{id}`.
    pub async fn get_job(&self, job_id: &str) -> Result<JobResponse> {
        Ok(self
            .load_job(job_id)
            .await?
            .ok_or_else(|| job_not_found(job_id))?
            .job)
    }

    /// `POST /jobs/v2/{id}/cancel`: stops a job that has not finished; returns its state.
    pub async fn cancel_job(&self, job_id: &str) -> Result<JobResponse> {
        let job = self.get_job(job_id).await?;
        if is_terminal(&job.status) {
            return Ok(job);
        }
        let switch = self
            .jobs
            .cancels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(job_id)
            .cloned();
        match switch {
            Some(tx) => {
                let _ = tx.send(true);
                // The runner records the cancellation; wait for it, briefly.
                for _ in 0..100 {
                    let now = self.get_job(job_id).await?;
                    if is_terminal(&now.status) {
                        return Ok(now);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                self.get_job(job_id).await
            }
            None => {
                // In a cluster the runner is the leader's: ask it, and wait for it to record
                // the cancellation; a job no node runs is cancelled here.
                if let Some(bus) = self.cluster() {
                    let notice = crate::cluster::Notice::CancelJob {
                        job_id: job_id.to_owned(),
                    };
                    bus.broadcast(&notice).await;
                    for _ in 0..100 {
                        let now = self.get_job(job_id).await?;
                        if is_terminal(&now.status) {
                            return Ok(now);
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                let mut stored = self
                    .load_job(job_id)
                    .await?
                    .ok_or_else(|| job_not_found(job_id))?;
                stored.job.status = "cancelled".into();
                stored.job.end_time = Some(keys::now_text());
                self.save_job(&stored).await?;
                self.emit(self.job_event(&stored.job, JobStep::Ended)).await;
                Ok(stored.job)
            }
        }
    }

    /// `GET /jobs/v2/query`: one page of jobs filtered by type and status, in job id order,
    /// after `continuation` (from the previous page). Returns the jobs and the next page's
    /// continuation token.
    pub async fn list_jobs(
        &self,
        job_type: Option<&str>,
        status: Option<&str>,
        page_size: Option<usize>,
        continuation: Option<&str>,
    ) -> Result<(Vec<JobResponse>, Option<String>)> {
        let page_size = page_size.unwrap_or(DEFAULT_JOB_PAGE);
        if page_size == 0 || page_size > MAX_JOB_PAGE {
            return Err(Error::invalid(format!(
                "pageSize must be between 1 and {MAX_JOB_PAGE}"
            )));
        }
        let mut after = continuation.map(decode_job_cursor).transpose()?;
        let mut out = Vec::new();
        loop {
            let page = self.store.scan(Table::Jobs, after.as_deref(), 500).await?;
            let Some((last, _)) = page.last() else {
                return Ok((out, None));
            };
            let full = page.len() == 500;
            let last = last.clone();
            for (key, bytes) in &page {
                let Ok(stored) = serde_json::from_slice::<StoredJob>(bytes) else {
                    tracing::warn!(job_id = %crate::logsafe::Shown(key), "skipping a job record that cannot be decoded");
                    continue;
                };
                if job_type.is_none_or(|t| t == stored.job.job_type)
                    && status.is_none_or(|s| s == stored.job.status)
                {
                    out.push(stored.job);
                    if out.len() == page_size {
                        let more = full || key != &last;
                        return Ok((out, more.then(|| encode_job_cursor(key))));
                    }
                }
            }
            if !full {
                return Ok((out, None));
            }
            after = Some(last);
        }
    }

    /// Every job, for resuming (records that cannot be decoded are skipped).
    async fn all_jobs(&self) -> Result<Vec<JobResponse>> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self.store.scan(Table::Jobs, after.as_deref(), 500).await?;
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            out.extend(
                page.iter()
                    .filter_map(|(_, bytes)| serde_json::from_slice::<StoredJob>(bytes).ok())
                    .map(|s| s.job),
            );
        }
        Ok(out)
    }

    /// Removes finished jobs (and their per-device records) that ended more than the
    /// retention period ago. Returns how many were removed.
    pub async fn sweep_finished_jobs(&self) -> Result<usize> {
        let cutoff = jiff::Timestamp::now()
            .checked_sub(
                jiff::SignedDuration::try_from(self.jobs.retention)
                    .unwrap_or(jiff::SignedDuration::MAX),
            )
            .unwrap_or(jiff::Timestamp::MIN);
        let mut removed = 0;
        for job in self.all_jobs().await? {
            let ended = job.end_time.as_deref().and_then(parse_timestamp);
            if !is_terminal(&job.status) || ended.is_none_or(|t| t > cutoff) {
                continue;
            }
            let _guard = self.locks.lock(&format!("job/{}", job.job_id)).await;
            let mut writes = vec![Write::delete(Table::Jobs, job.job_id.clone())];
            let prefix = format!("{}/", job.job_id);
            let mut after = Some(prefix.clone());
            loop {
                let page = self
                    .store
                    .scan(Table::DeviceJobs, after.as_deref(), 1000)
                    .await?;
                let mut done = page.len() < 1000;
                for (key, _) in &page {
                    if !key.starts_with(&prefix) {
                        done = true;
                        break;
                    }
                    writes.push(Write::delete(Table::DeviceJobs, key.clone()));
                }
                match page.last() {
                    Some((k, _)) if !done => after = Some(k.clone()),
                    _ => break,
                }
            }
            for chunk in writes.chunks(1000) {
                self.store.commit(chunk.to_vec()).await?;
            }
            removed += 1;
        }
        if removed > 0 {
            tracing::info!(removed, "removed finished jobs past their retention");
        }
        Ok(removed)
    }

    /// Starts the hourly removal of finished jobs past their retention.
    pub(crate) fn spawn_retention(self: &Arc<Self>) {
        let hub = Arc::downgrade(self);
        let mut suspend = self.jobs.suspend.subscribe();
        tokio::spawn(async move {
            loop {
                let Some(h) = hub.upgrade() else { return };
                if let Err(e) = h.sweep_finished_jobs().await {
                    tracing::warn!("removing old jobs failed: {}", e.message());
                }
                drop(h);
                tokio::select! {
                    _ = tokio::time::sleep(RETENTION_SWEEP_EVERY) => {}
                    _ = suspend.wait_for(|s| *s) => return,
                }
            }
        });
    }

    /// Stops every job runner without recording an outcome (hub shutdown). Call before
    /// device sessions close, so no device is marked failed for the hub's own exit.
    pub fn suspend_jobs(&self) {
        self.jobs.suspend.send_replace(true);
    }

    /// Restarts the runners of jobs that had not finished when the hub stopped.
    pub(crate) async fn resume_jobs(self: &Arc<Self>) -> Result<()> {
        for job in self.all_jobs().await? {
            if !is_terminal(&job.status) && !self.job_is_running(&job.job_id) {
                tracing::info!(job_id = %job.job_id, status = %job.status, "resuming job");
                self.spawn_job(job.job_id);
            }
        }
        Ok(())
    }

    async fn load_job(&self, job_id: &str) -> Result<Option<StoredJob>> {
        match self.store.get(Table::Jobs, job_id).await? {
            Some(bytes) => Ok(Some(
                serde_json::from_slice(&bytes).map_err(|_| Error::internal())?,
            )),
            None => Ok(None),
        }
    }

    async fn save_job(&self, stored: &StoredJob) -> Result<()> {
        let bytes = serde_json::to_vec(stored).unwrap_or_default();
        self.store
            .commit(vec![Write::put(
                Table::Jobs,
                stored.job.job_id.clone(),
                bytes,
            )])
            .await?;
        Ok(())
    }

    /// Whether this hub runs the job now.
    pub(crate) fn job_is_running(&self, job_id: &str) -> bool {
        self.jobs
            .cancels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(job_id)
    }

    /// Flips a running job's cancel switch; false when this hub does not run it.
    pub(crate) fn cancel_running_job(&self, job_id: &str) -> bool {
        let switch = self
            .jobs
            .cancels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(job_id)
            .cloned();
        switch.is_some_and(|tx| tx.send(true).is_ok())
    }

    pub(crate) fn spawn_job(self: &Arc<Self>, job_id: String) {
        let (tx, rx) = watch::channel(false);
        {
            let mut cancels = self.jobs.cancels.lock().unwrap_or_else(|e| e.into_inner());
            if cancels.contains_key(&job_id) {
                return;
            }
            cancels.insert(job_id.clone(), tx);
        }
        let hub = self.clone();
        let mut suspend = self.jobs.suspend.subscribe();
        let mut leading = self.jobs.leading.subscribe();
        tokio::spawn(async move {
            // Whatever happens to the runner (even a panic), its cancel switch goes, so a
            // cancel never waits on a runner that is gone.
            let _forget = ForgetCancel {
                hub: hub.clone(),
                job_id: job_id.clone(),
            };
            let outcome = tokio::select! {
                r = hub.run_job(&job_id, rx) => Some(r),
                _ = suspend.wait_for(|s| *s) => None,
                // Another node leads now and resumes the job where it was recorded.
                _ = leading.wait_for(|l| !*l) => None,
            };
            if let Some(Err(e)) = outcome {
                tracing::error!(%job_id, "job runner failed: {}", e.message());
                if let Ok(Some(mut stored)) = hub.load_job(&job_id).await {
                    stored.job.status = "failed".into();
                    stored.job.failure_reason = Some(e.message().to_string());
                    stored.job.end_time = Some(keys::now_text());
                    if hub.save_job(&stored).await.is_ok() {
                        hub.emit(hub.job_event(&stored.job, JobStep::Ended)).await;
                    }
                }
            }
        });
    }

    /// All per-device records of a job.
    async fn device_jobs(&self, job_id: &str) -> Result<Vec<DeviceJob>> {
        let prefix = format!("{job_id}/");
        let mut after = Some(prefix.clone());
        let mut out = Vec::new();
        loop {
            let page = self
                .store
                .scan(Table::DeviceJobs, after.as_deref(), 1000)
                .await?;
            let full = page.len() == 1000;
            for (key, bytes) in &page {
                if !key.starts_with(&prefix) {
                    return Ok(out);
                }
                out.push(serde_json::from_slice(bytes).map_err(|_| Error::internal())?);
            }
            match page.last() {
                Some((k, _)) if full => after = Some(k.clone()),
                _ => return Ok(out),
            }
        }
    }

    async fn save_device_jobs(&self, records: &[DeviceJob]) -> Result<()> {
        let writes = records
            .iter()
            .map(|r| {
                Write::put(
                    Table::DeviceJobs,
                    device_job_key(&r.job_id, &r.device_id),
                    serde_json::to_vec(r).unwrap_or_default(),
                )
            })
            .collect::<Vec<_>>();
        if !writes.is_empty() {
            self.store.commit(writes).await?;
        }
        Ok(())
    }

    /// Every device id matching `condition`, in id order.
    async fn job_targets(&self, condition: Option<&Expr>) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self
                .store
                .scan(Table::Devices, after.as_deref(), 1000)
                .await?;
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            for (id, bytes) in &page {
                let matched = match condition {
                    None => true,
                    Some(expr) => {
                        let Ok(rec) = DeviceRecord::decode(bytes) else {
                            continue;
                        };
                        let doc =
                            serde_json::to_value(self.render_twin(&rec)).unwrap_or(Value::Null);
                        expr.matches(&doc)
                    }
                };
                if matched {
                    out.push(id.clone());
                }
            }
        }
        Ok(out)
    }

    async fn run_job(
        self: &Arc<Self>,
        job_id: &str,
        mut cancel: watch::Receiver<bool>,
    ) -> Result<()> {
        let mut stored = self
            .load_job(job_id)
            .await?
            .ok_or_else(|| job_not_found(job_id))?;
        let op = operation(&stored.job)?;
        let start = stored
            .job
            .start_time
            .as_deref()
            .and_then(parse_timestamp)
            .unwrap_or_else(jiff::Timestamp::now);
        let wait = start.duration_since(jiff::Timestamp::now());
        if wait.is_positive() {
            let wait = Duration::try_from(wait).unwrap_or(Duration::ZERO);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = cancel.wait_for(|c| *c) => {}
            }
        }
        if *cancel.borrow() {
            return self.finish_job(stored, Vec::new(), "cancelled", None).await;
        }
        let max = Duration::from_secs(
            stored
                .job
                .max_execution_time_in_seconds
                .unwrap_or(DEFAULT_MAX_EXECUTION) as u64,
        );
        // The clock runs from the start time, so a job resumed after a restart keeps its limit;
        // a start time before the job was created means "now", so the clock starts at creation.
        let clock_start = stored
            .job
            .created_time
            .as_deref()
            .and_then(parse_timestamp)
            .map_or(start, |created| start.max(created));
        let elapsed = Duration::try_from(jiff::Timestamp::now().duration_since(clock_start))
            .unwrap_or(Duration::ZERO);
        // Validated at creation, but a stored job may predate that: never overflow.
        let now = tokio::time::Instant::now();
        let deadline = now
            .checked_add(max.saturating_sub(elapsed))
            .unwrap_or_else(|| now + Duration::from_secs(MAX_EXECUTION as u64));
        stored.job.status = "running".into();
        self.save_job(&stored).await?;

        let now = keys::now_text();
        let mut records = if stored.targets_resolved {
            self.device_jobs(job_id).await?
        } else {
            let condition = parse_condition(stored.job.query_condition.as_deref().unwrap_or("*"))?;
            let targets = self.job_targets(condition.as_ref()).await?;
            let records: Vec<DeviceJob> = targets
                .into_iter()
                .map(|device_id| DeviceJob {
                    device_id,
                    job_id: job_id.to_string(),
                    job_type: stored.job.job_type.clone(),
                    status: "pending".into(),
                    start_time_utc: None,
                    end_time_utc: None,
                    created_date_time_utc: now.clone(),
                    last_updated_date_time_utc: now.clone(),
                    outcome: json!({ "deviceMethodResponse": null }),
                    error: None,
                })
                .collect();
            for chunk in records.chunks(1000) {
                self.save_device_jobs(chunk).await?;
            }
            stored.targets_resolved = true;
            records
        };
        // A device that was running when the hub stopped starts over.
        for r in records.iter_mut().filter(|r| r.status == "running") {
            r.status = "pending".into();
        }
        stored.job.device_job_statistics = Some(statistics(&records));
        self.save_job(&stored).await?;

        let index: HashMap<String, usize> = records
            .iter()
            .enumerate()
            .map(|(i, r)| (r.device_id.clone(), i))
            .collect();
        let pending: Vec<String> = records
            .iter()
            .filter(|r| r.status == "pending")
            .map(|r| r.device_id.clone())
            .collect();
        let mut tasks: JoinSet<(String, std::result::Result<Value, Error>, String)> =
            JoinSet::new();
        let mut queue = pending.into_iter();
        let mut last_saved = tokio::time::Instant::now();
        let mut stats_behind = false;
        let mut outcome = "completed";
        loop {
            while tasks.len() < PER_JOB_IN_FLIGHT {
                let Some(device_id) = queue.next() else { break };
                let permit = tokio::select! {
                    p = self.jobs.budget.clone().acquire_owned() => p.map_err(|_| Error::internal())?,
                    _ = cancel.wait_for(|c| *c) => { outcome = "cancelled"; break }
                    _ = tokio::time::sleep_until(deadline) => { outcome = "failed"; break }
                };
                if let Some(&i) = index.get(&device_id) {
                    records[i].status = "running".into();
                    records[i].start_time_utc = Some(keys::now_text());
                }
                let hub = self.clone();
                let op = op.clone();
                tasks.spawn(async move {
                    let _permit = permit;
                    let started = keys::now_text();
                    let result = match op {
                        Operation::Method(call) => hub.invoke_method(&device_id, call).await.map(|r| {
                            let payload: Value = serde_json::from_slice(&r.payload).unwrap_or(Value::Null);
                            json!({ "deviceMethodResponse": { "status": r.status, "payload": payload } })
                        }),
                        // Its own task: a twin write whose commit started must still push the
                        // desired patch, even if the job is cancelled meanwhile.
                        Operation::Twin(body) => {
                            let (hub, id) = (hub.clone(), device_id.clone());
                            match tokio::spawn(async move { hub.write_twin(&id, &body, None, false).await }).await {
                                Ok(r) => r.map(|_| json!({ "deviceMethodResponse": null })),
                                Err(_) => Err(Error::internal()),
                            }
                        }
                    };
                    (device_id, result, started)
                });
            }
            if outcome != "completed" || tasks.is_empty() {
                break;
            }
            // `None`: the timer to count results recorded but not yet counted in the job, so
            // progress shows while the job waits on a slow or offline device.
            let woke = tokio::select! {
                j = tasks.join_next() => Some(j),
                _ = cancel.wait_for(|c| *c) => { outcome = "cancelled"; break }
                _ = tokio::time::sleep_until(deadline) => { outcome = "failed"; break }
                _ = tokio::time::sleep_until(last_saved + STATS_EVERY), if stats_behind => None,
            };
            let Some(joined) = woke else {
                stored.job.device_job_statistics = Some(statistics(&records));
                self.save_job(&stored).await?;
                last_saved = tokio::time::Instant::now();
                stats_behind = false;
                continue;
            };
            // Record this result and every other one already finished in one durable write.
            let mut finished: Vec<_> = joined.into_iter().flatten().collect();
            while let Some(more) = tasks.try_join_next() {
                finished.extend(more);
            }
            let mut changed = Vec::with_capacity(finished.len());
            for (device_id, result, started) in finished {
                let Some(&i) = index.get(&device_id) else {
                    continue;
                };
                let r = &mut records[i];
                let now = keys::now_text();
                r.start_time_utc = Some(started);
                r.end_time_utc = Some(now.clone());
                r.last_updated_date_time_utc = now;
                match result {
                    Ok(out) => {
                        r.status = "completed".into();
                        r.outcome = out;
                    }
                    Err(e) => {
                        r.status = "failed".into();
                        r.error =
                            Some(json!({ "code": e.code().name(), "description": e.message() }));
                    }
                }
                changed.push(r.clone());
            }
            self.save_device_jobs(&changed).await?;
            if last_saved.elapsed() >= STATS_EVERY {
                stored.job.device_job_statistics = Some(statistics(&records));
                self.save_job(&stored).await?;
                last_saved = tokio::time::Instant::now();
                stats_behind = false;
            } else {
                stats_behind = true;
            }
        }
        tasks.abort_all();
        let reason = match outcome {
            "failed" => Some("The job exceeded its maxExecutionTimeInSeconds".to_string()),
            _ => None,
        };
        self.finish_job(stored, records, outcome, reason).await
    }

    /// Marks unfinished devices (cancelled, or failed when out of time) and the job itself.
    async fn finish_job(
        &self,
        mut stored: StoredJob,
        mut records: Vec<DeviceJob>,
        status: &str,
        reason: Option<String>,
    ) -> Result<()> {
        let now = keys::now_text();
        let device_status = if status == "cancelled" {
            "cancelled"
        } else {
            "failed"
        };
        let mut changed = Vec::new();
        for r in records
            .iter_mut()
            .filter(|r| r.status == "pending" || r.status == "running")
        {
            r.status = device_status.into();
            r.end_time_utc = Some(now.clone());
            r.last_updated_date_time_utc = now.clone();
            if let Some(why) = &reason {
                r.error =
                    Some(json!({ "code": "JobExceededMaxExecutionTime", "description": why }));
            }
            changed.push(r.clone());
        }
        for chunk in changed.chunks(1000) {
            self.save_device_jobs(chunk).await?;
        }
        stored.job.status = status.into();
        stored.job.end_time = Some(now);
        stored.job.failure_reason = reason;
        stored.job.device_job_statistics = Some(statistics(&records));
        self.save_job(&stored).await?;
        self.emit(self.job_event(&stored.job, JobStep::Ended)).await;
        tracing::info!(job_id = %stored.job.job_id, status, "job finished");
        Ok(())
    }
}

/// Removes a runner's cancel switch when the runner ends, however it ends.
struct ForgetCancel {
    hub: Arc<Hub>,
    job_id: String,
}

impl Drop for ForgetCancel {
    fn drop(&mut self) {
        self.hub
            .jobs
            .cancels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.job_id);
    }
}

fn encode_job_cursor(job_id: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(job_id)
}

fn decode_job_cursor(token: &str) -> Result<String> {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token.trim())
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| Error::invalid("The continuation token is not valid"))
}

/// Whether `bytes` decode as a stored job.
pub(crate) fn is_valid_job(bytes: &[u8]) -> bool {
    serde_json::from_slice::<StoredJob>(bytes).is_ok()
}

/// Job records that cannot be decoded (for the quarantine at open).
pub(crate) async fn undecodable_jobs(hub: &Hub) -> Result<Vec<(String, Vec<u8>)>> {
    let mut bad = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = hub.store.scan(Table::Jobs, after.as_deref(), 500).await?;
        let Some((last, _)) = page.last() else { break };
        after = Some(last.clone());
        for (key, bytes) in page {
            if serde_json::from_slice::<StoredJob>(&bytes).is_err() {
                bad.push((key, bytes));
            }
        }
    }
    Ok(bad)
}

fn statistics(records: &[DeviceJob]) -> DeviceJobStatistics {
    let mut s = DeviceJobStatistics {
        device_count: records.len() as u64,
        ..Default::default()
    };
    for r in records {
        match r.status.as_str() {
            "completed" => s.succeeded_count += 1,
            "failed" | "cancelled" => s.failed_count += 1,
            "running" => s.running_count += 1,
            _ => s.pending_count += 1,
        }
    }
    s
}
