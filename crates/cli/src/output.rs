//! Human-readable rendering of events, task records and agents.

use flotilla_protocol::{AgentRecord, TaskEvent, TaskRecord, time::from_ms, time::now_ms};

/// `HH:MM:SS.mmm` of an epoch-ms timestamp (UTC).
pub fn clock(ms: u64) -> String {
    let s = humantime::format_rfc3339_millis(from_ms(ms)).to_string();
    s.get(11..23).unwrap_or(&s).to_owned()
}

fn short(v: &serde_json::Value, max: usize) -> String {
    let s = match v {
        serde_json::Value::Object(m) => match m.get("answer") {
            Some(serde_json::Value::String(a)) => a.clone(),
            _ => v.to_string(),
        },
        other => other.to_string(),
    };
    if s.chars().count() > max { format!("{}…", s.chars().take(max).collect::<String>()) } else { s }
}

/// One line per event.
pub fn event_line(e: &TaskEvent) -> String {
    let mut line = format!("{}  {:<10} {}", clock(e.at_ms), e.kind, e.task_id);
    if let Some(a) = &e.agent_id {
        line.push_str(&format!("  agent={a}"));
    }
    if let Some(n) = e.attempt {
        line.push_str(&format!("  attempt={n}"));
    }
    if let Some(r) = &e.reason {
        line.push_str(&format!("  reason={r}"));
    }
    if let Some(by) = &e.actor {
        line.push_str(&format!("  by={by}"));
    }
    if e.kind == flotilla_protocol::names::event_kind::APPROVAL_DECIDED
        && let Some(d) = e.detail.as_ref().and_then(|d| d.get("decision")).and_then(|d| d.as_str())
    {
        line.push_str(&format!("  decision={d}"));
    }
    if let Some(s) = e.step {
        line.push_str(&format!("  step={s}"));
    }
    if let Some(t) = &e.text_delta {
        line.push_str(&format!("  text={:?}", t.chars().take(100).collect::<String>()));
    }
    if let Some(u) = &e.usage {
        line.push_str(&format!("  tokens={}", u.total_tokens));
    }
    if let Some(err) = &e.error {
        line.push_str(&format!("  error={}: {}", err.code, err.message));
    }
    if let Some(o) = &e.output {
        line.push_str(&format!("  output={}", short(o, 100)));
    }
    line
}

/// The tool calls a `progress` event reports, as one line (`None` when there are none).
pub fn tool_calls_line(e: &TaskEvent) -> Option<String> {
    let calls = e.detail.as_ref()?.get("tool_calls")?.as_array()?;
    if calls.is_empty() {
        return None;
    }
    let list: Vec<String> = calls
        .iter()
        .map(|c| {
            let name = c.get("name").and_then(|n| n.as_str()).unwrap_or("?");
            let args = c.get("arguments").map(|a| short(a, 80)).unwrap_or_default();
            format!("{name}({args})")
        })
        .collect();
    Some(format!("{}  step {}: calls {}", e.task_id, e.step.unwrap_or(0), list.join(", ")))
}

/// A task record, several lines.
pub fn task_block(r: &TaskRecord) -> String {
    let mut s = format!(
        "task       {}\nstate      {}\ncapability {}\npriority   {}\ntenant     {}\nattempt    {} of {}\nsubmitted  {}\n",
        r.id,
        r.state.as_str(),
        r.capability,
        r.priority,
        r.tenant,
        r.attempt,
        r.max_attempts,
        humantime::format_rfc3339_millis(from_ms(r.submitted_at_ms)),
    );
    if let Some(a) = &r.agent_id {
        s.push_str(&format!("agent      {a}\n"));
    }
    if let Some(u) = &r.usage {
        s.push_str(&format!(
            "tokens     {} (prompt {}, completion {})\n",
            u.total_tokens, u.prompt_tokens, u.completion_tokens
        ));
    }
    if let Some(e) = &r.error {
        s.push_str(&format!("error      {}: {}\n", e.code, e.message));
    }
    if let Some(o) = &r.output {
        s.push_str(&format!("output     {}\n", short(o, 400)));
    }
    for a in &r.attempts {
        s.push_str(&format!(
            "failed     attempt {} on {}: {}: {}\n",
            a.attempt,
            a.agent_id.as_deref().unwrap_or("-"),
            a.error.code,
            a.error.message
        ));
    }
    for w in &r.warnings {
        s.push_str(&format!("warning    {w}\n"));
    }
    s
}

/// A table of agents.
pub fn agents_table(agents: &[AgentRecord]) -> String {
    let mut s = format!(
        "{:<36} {:<10} {:<9} {:>4}/{:<4} {:<8} {}\n",
        "AGENT", "TEMPLATE", "STATUS", "LOAD", "CAP", "BEAT", "CAPABILITIES"
    );
    for a in agents {
        let age = now_ms().saturating_sub(a.heartbeat_at_ms);
        let status = if age > a.heartbeat_interval_ms.saturating_mul(3) + 500 {
            "dead".to_owned()
        } else {
            format!("{:?}", a.status).to_lowercase()
        };
        s.push_str(&format!(
            "{:<36} {:<10} {:<9} {:>4}/{:<4} {:<8} {}\n",
            a.agent_id,
            a.name,
            status,
            a.in_flight,
            a.concurrency,
            format!("{:.1}s", age as f64 / 1000.0),
            a.capabilities.join(",")
        ));
    }
    s
}
