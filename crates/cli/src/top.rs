//! `flotilla top`: a live terminal view of the fleet (agents, queue, throughput, alerts and
//! deadlocks), drawn with ratatui from the monitor's overview (`/api/overview`, the dashboard's
//! figures), refreshed every second. Keys: `s` sorts the agents by another column, `/` filters
//! them by text, `Esc` clears the filter, `q` quits. `--once` draws one frame into ratatui's test
//! backend and prints it (for scripts and tests).

use std::io::Write as _;
use std::time::Duration;

use anyhow::Context as _;
use ratatui::Terminal;
use ratatui::backend::{Backend, CrosstermBackend, TestBackend};
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind};
use ratatui::crossterm::{execute, terminal};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Paragraph, Row, Sparkline, Table};
use serde_json::Value;

use crate::client::connect;
use crate::{Cli, Failure, exit};

#[derive(Debug, clap::Args)]
pub struct TopArgs {
    /// The monitor's HTTP address (default: the one a monitor announces in its health reply).
    #[arg(long)]
    pub monitor: Option<String>,
    /// Draw one frame and print it, instead of the live view.
    #[arg(long)]
    pub once: bool,
    /// The frame's size with `--once`.
    #[arg(long, default_value_t = 120)]
    pub width: u16,
    #[arg(long, default_value_t = 40)]
    pub height: u16,
}

/// How the agents are sorted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SortBy {
    #[default]
    Agent,
    Status,
    InFlight,
    Heartbeat,
}

impl SortBy {
    fn next(self) -> Self {
        match self {
            Self::Agent => Self::Status,
            Self::Status => Self::InFlight,
            Self::InFlight => Self::Heartbeat,
            Self::Heartbeat => Self::Agent,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Agent => "agent",
            Self::Status => "status",
            Self::InFlight => "in flight",
            Self::Heartbeat => "heartbeat",
        }
    }
}

/// What the keys changed.
#[derive(Debug, Default, Clone)]
pub struct View {
    pub sort: SortBy,
    pub filter: String,
    /// Typing a filter (after `/`).
    pub typing: bool,
}

impl View {
    /// Applies a key; false when it asks to quit.
    pub fn key(&mut self, code: KeyCode) -> bool {
        if self.typing {
            match code {
                KeyCode::Enter => self.typing = false,
                KeyCode::Esc => {
                    self.typing = false;
                    self.filter.clear();
                }
                KeyCode::Backspace => {
                    self.filter.pop();
                }
                KeyCode::Char(c) => self.filter.push(c),
                _ => {}
            }
            return true;
        }
        match code {
            KeyCode::Char('q') => return false,
            KeyCode::Char('s') => self.sort = self.sort.next(),
            KeyCode::Char('/') => {
                self.typing = true;
                self.filter.clear();
            }
            KeyCode::Esc => self.filter.clear(),
            _ => {}
        }
        true
    }
}

fn text(v: &Value, path: &[&str]) -> String {
    let mut cur = v;
    for p in path {
        match cur.get(p) {
            Some(x) => cur = x,
            None => return "-".to_owned(),
        }
    }
    match cur {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    }
}

fn num(v: &Value, path: &[&str]) -> u64 {
    let mut cur = v;
    for p in path {
        match cur.get(p) {
            Some(x) => cur = x,
            None => return 0,
        }
    }
    cur.as_u64().unwrap_or(0)
}

/// The agents shown: filtered by `view.filter` (any column) and sorted by `view.sort`.
pub fn agents<'a>(o: &'a Value, view: &View) -> Vec<&'a Value> {
    let mut list: Vec<&Value> = o
        .get("agents")
        .and_then(|a| a.get("list"))
        .and_then(Value::as_array)
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    if !view.filter.is_empty() {
        let f = view.filter.to_lowercase();
        list.retain(|a| a.to_string().to_lowercase().contains(&f));
    }
    match view.sort {
        SortBy::Agent => list.sort_by_key(|a| text(a, &["agent_id"])),
        SortBy::Status => list.sort_by_key(|a| (text(a, &["status"]), text(a, &["agent_id"]))),
        SortBy::InFlight => {
            list.sort_by_key(|a| (std::cmp::Reverse(num(a, &["in_flight"])), text(a, &["agent_id"])))
        }
        SortBy::Heartbeat => {
            list.sort_by_key(|a| (std::cmp::Reverse(num(a, &["heartbeat_age_ms"])), text(a, &["agent_id"])));
        }
    }
    list
}

fn status_style(status: &str) -> Style {
    match status {
        "idle" => Style::default().fg(Color::Green),
        "busy" => Style::default().fg(Color::Cyan),
        "draining" => Style::default().fg(Color::Yellow),
        _ => Style::default().fg(Color::Red),
    }
}

/// Draws one frame of the overview `o`.
pub fn draw(frame: &mut ratatui::Frame<'_>, o: &Value, view: &View) {
    let area = frame.area();
    let [head, middle, agents_area, alerts_area] = Layout::vertical([
        Constraint::Length(3),
        Constraint::Length(7),
        Constraint::Min(5),
        Constraint::Length(6),
    ])
    .areas(area);
    let t = |k: &str| num(o, &["tasks", k]);
    let header = Line::from(vec![
        Span::styled("flotilla top ", Style::default().add_modifier(Modifier::BOLD)),
        Span::raw(format!(
            " submitted {}  completed {}  failed {}  running {}  queued {}  deadlocks {}  cost/h ${:.4}  monitor {}",
            t("submitted"),
            t("completed"),
            t("failed"),
            t("running"),
            num(o, &["queue", "total"]),
            num(o, &["deadlocks", "total"]),
            o.get("cost").and_then(|c| c.get("usd_last_hour")).and_then(Value::as_f64).unwrap_or(0.0),
            text(o, &["monitor"]),
        )),
    ]);
    frame.render_widget(Paragraph::new(header).block(Block::default().borders(Borders::ALL)), head);

    let [chart, priority, tenant] = Layout::horizontal([
        Constraint::Percentage(50),
        Constraint::Percentage(25),
        Constraint::Percentage(25),
    ])
    .areas(middle);
    let done: Vec<u64> = o
        .get("charts")
        .and_then(|c| c.get("completed"))
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    let per_10s = done.last().copied().unwrap_or(0);
    frame.render_widget(
        Sparkline::default()
            .block(
                Block::default()
                    .borders(Borders::ALL)
                    .title(format!("throughput: {per_10s} completed in the last 10 s")),
            )
            .data(&done)
            .style(Style::default().fg(Color::Cyan)),
        chart,
    );
    let by = |key: &str| -> Vec<Line<'static>> {
        let Some(m) = o.get("queue").and_then(|q| q.get(key)).and_then(Value::as_object) else {
            return vec![Line::raw("none")];
        };
        if m.is_empty() {
            return vec![Line::raw("none")];
        }
        m.iter().map(|(k, v)| Line::raw(format!("{k:<12} {v}"))).collect()
    };
    frame.render_widget(
        Paragraph::new(by("by_priority"))
            .block(Block::default().borders(Borders::ALL).title("queue by priority")),
        priority,
    );
    frame.render_widget(
        Paragraph::new(by("by_tenant"))
            .block(Block::default().borders(Borders::ALL).title("queue by tenant")),
        tenant,
    );

    let shown = agents(o, view);
    let total = o.get("agents").and_then(|a| a.get("list")).and_then(Value::as_array).map_or(0, Vec::len);
    let title = format!(
        "agents {}/{total}  sort: {} (s)  filter: {}{} (/, Esc)  q quits",
        shown.len(),
        view.sort.name(),
        if view.filter.is_empty() { "none" } else { view.filter.as_str() },
        if view.typing { "_" } else { "" },
    );
    let rows: Vec<Row<'_>> = shown
        .iter()
        .map(|a| {
            let status = text(a, &["status"]);
            Row::new(vec![
                text(a, &["agent_id"]),
                text(a, &["runner_id"]),
                text(a, &["template"]),
                status.clone(),
                text(a, &["state"]),
                format!("{}/{}", num(a, &["in_flight"]), num(a, &["concurrency"])),
                format!("{} ms", num(a, &["heartbeat_age_ms"])),
            ])
            .style(status_style(&status))
        })
        .collect();
    let widths = [
        Constraint::Percentage(26),
        Constraint::Percentage(10),
        Constraint::Percentage(16),
        Constraint::Percentage(10),
        Constraint::Percentage(12),
        Constraint::Percentage(10),
        Constraint::Percentage(16),
    ];
    frame.render_widget(
        Table::new(rows, widths)
            .header(
                Row::new(vec!["AGENT", "RUNNER", "TEMPLATE", "STATUS", "STATE", "IN FLIGHT", "HEARTBEAT"])
                    .style(Style::default().add_modifier(Modifier::BOLD)),
            )
            .block(Block::default().borders(Borders::ALL).title(title)),
        agents_area,
    );

    let alerts: Vec<Line<'_>> = o
        .get("alerts")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|x| {
                    Line::from(vec![
                        Span::styled(format!("{} ", text(x, &["kind"])), Style::default().fg(Color::Red)),
                        Span::raw(text(x, &["message"])),
                    ])
                })
                .collect()
        })
        .unwrap_or_default();
    let alerts = if alerts.is_empty() { vec![Line::raw("none firing")] } else { alerts };
    frame.render_widget(
        Paragraph::new(alerts).block(Block::default().borders(Borders::ALL).title("alerts")),
        alerts_area,
    );
}

/// The monitor's HTTP address: given, or from a monitor's health reply.
async fn monitor_addr(cli: &Cli, given: Option<&str>) -> Result<String, Failure> {
    if let Some(m) = given {
        return Ok(m.trim_start_matches("http://").trim_end_matches('/').to_owned());
    }
    let fleet = connect(cli).await?;
    let found = crate::health::instances(&fleet).await?;
    found
        .iter()
        .filter(|h| h.service == flotilla_protocol::names::service::MONITOR)
        .find_map(|h| h.details.get("http_addr").and_then(Value::as_str).map(str::to_owned))
        .ok_or_else(|| {
            Failure::new(exit::UNAVAILABLE, anyhow::anyhow!("no monitor answered (is one running?)"))
        })
}

async fn fetch(http: &reqwest::Client, addr: &str) -> anyhow::Result<Value> {
    let url = format!("http://{addr}/api/overview");
    let r = http
        .get(&url)
        .timeout(Duration::from_secs(3))
        .send()
        .await
        .with_context(|| format!("failed to ask {url}"))?;
    r.json().await.with_context(|| format!("unreadable answer from {url}"))
}

/// The frame of `o` at `width` × `height`, as text (ratatui's test backend).
pub fn render_text(o: &Value, view: &View, width: u16, height: u16) -> anyhow::Result<String> {
    let mut term = Terminal::new(TestBackend::new(width, height)).context("no test backend")?;
    term.draw(|f| draw(f, o, view)).context("failed to draw")?;
    let buf = term.backend().buffer().clone();
    let mut out = String::new();
    for y in 0..buf.area.height {
        for x in 0..buf.area.width {
            out.push_str(buf.cell((x, y)).map_or(" ", |c| c.symbol()));
        }
        out.push('\n');
    }
    Ok(out)
}

pub async fn run(cli: &Cli, args: &TopArgs) -> Result<(), Failure> {
    let addr = monitor_addr(cli, args.monitor.as_deref()).await?;
    // reqwest is built without a TLS provider of its own: the workspace's is ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::new();
    if args.once {
        let o = fetch(&http, &addr).await.map_err(|e| Failure::new(exit::UNAVAILABLE, e))?;
        print!("{}", render_text(&o, &View::default(), args.width, args.height)?);
        return Ok(());
    }
    terminal::enable_raw_mode().context("not a terminal")?;
    let mut stdout = std::io::stdout();
    execute!(stdout, terminal::EnterAlternateScreen).context("failed to take the screen")?;
    let result = live(&http, &addr, CrosstermBackend::new(std::io::stdout())).await;
    let _ = terminal::disable_raw_mode();
    let _ = execute!(stdout, terminal::LeaveAlternateScreen);
    let _ = stdout.flush();
    result.map_err(Failure::from)
}

async fn live<B: Backend>(http: &reqwest::Client, addr: &str, backend: B) -> anyhow::Result<()> {
    let mut term = Terminal::new(backend).context("no terminal")?;
    let mut view = View::default();
    let mut o = Value::Null;
    let mut last = tokio::time::Instant::now() - Duration::from_secs(2);
    loop {
        if last.elapsed() >= Duration::from_secs(1) {
            last = tokio::time::Instant::now();
            o = match fetch(http, addr).await {
                Ok(v) => v,
                Err(e) => serde_json::json!({ "alerts": [{ "kind": "top", "message": format!("{e:#}") }] }),
            };
        }
        term.draw(|f| draw(f, &o, &view)).context("failed to draw")?;
        if event::poll(Duration::from_millis(200)).context("failed to read keys")?
            && let Event::Key(k) = event::read().context("failed to read keys")?
            && k.kind == KeyEventKind::Press
            && !view.key(k.code)
        {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    fn overview() -> Value {
        serde_json::json!({
            "monitor": "monitor-1",
            "tasks": { "submitted": 12, "completed": 9, "failed": 2, "running": 1 },
            "queue": { "total": 3, "by_priority": { "normal": 2, "critical": 1 }, "by_tenant": { "acme": 3 } },
            "charts": { "completed": [0, 1, 4, 4] },
            "cost": { "usd_last_hour": 0.5 },
            "deadlocks": { "total": 1 },
            "agents": { "list": [
                { "agent_id": "r1-worker-1", "runner_id": "r1", "template": "worker", "status": "busy", "state": "executing", "in_flight": 2, "concurrency": 2, "heartbeat_age_ms": 120 },
                { "agent_id": "r1-worker-0", "runner_id": "r1", "template": "worker", "status": "idle", "state": "idle", "in_flight": 0, "concurrency": 2, "heartbeat_age_ms": 800 },
                { "agent_id": "r2-critic-0", "runner_id": "r2", "template": "critic", "status": "error", "state": "error", "in_flight": 0, "concurrency": 1, "heartbeat_age_ms": 50 }
            ] },
            "alerts": [{ "kind": "deadlock", "message": "deadlock of 2 tasks" }]
        })
    }

    #[test]
    fn the_frame_shows_agents_queue_and_alerts_and_keys_sort_and_filter() {
        let o = overview();
        let mut view = View::default();
        let frame = render_text(&o, &view, 120, 30).unwrap();
        for want in [
            "completed 9",
            "queued 3",
            "deadlocks 1",
            "critical",
            "acme",
            "r2-critic-0",
            "deadlock of 2 tasks",
            "agents 3/3",
        ] {
            assert!(frame.contains(want), "{want} in\n{frame}");
        }
        let order = |v: &View| agents(&o, v).iter().map(|a| text(a, &["agent_id"])).collect::<Vec<_>>();
        assert_eq!(order(&view), ["r1-worker-0", "r1-worker-1", "r2-critic-0"]);
        assert!(view.key(KeyCode::Char('s')));
        assert_eq!(
            order(&view),
            ["r1-worker-1", "r2-critic-0", "r1-worker-0"],
            "by status: busy, error, idle"
        );
        view.key(KeyCode::Char('s'));
        assert_eq!(order(&view)[0], "r1-worker-1", "most in flight first");
        for k in
            [KeyCode::Char('/'), KeyCode::Char('c'), KeyCode::Char('r'), KeyCode::Char('i'), KeyCode::Enter]
        {
            view.key(k);
        }
        assert_eq!(order(&view), ["r2-critic-0"]);
        let frame = render_text(&o, &view, 120, 30).unwrap();
        assert!(
            frame.contains("agents 1/3") && frame.contains("filter: cri") && !frame.contains("r1-worker-0"),
            "{frame}"
        );
        view.key(KeyCode::Esc);
        assert_eq!(order(&view).len(), 3);
        assert!(!view.key(KeyCode::Char('q')), "q quits");
    }
}
