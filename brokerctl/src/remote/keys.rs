//! `brokerctl keys status | rotate | retire`.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};

use super::*;

/// `brokerctl keys status [--wait]`.
pub async fn key_status(
    conn: &ConnArgs,
    args: &KeyStatusArgs,
    io: &mut Io<'_>,
) -> Result<(), CtlError> {
    let mut s = Session::open(conn).await?;
    // On a terminal `--wait` redraws one bar; otherwise it prints a line per ask.
    let mut bar: Option<RewrapBar> = None;
    let r = loop {
        let r = s
            .admin
            .key_status(pb::KeyStatusRequest {})
            .await
            .map_err(CtlError::remote("KeyStatus"))?
            .into_inner();
        let w = r.rewrap.unwrap_or_default();
        if !args.wait || w.remaining == 0 {
            break r;
        }
        if io.output == Output::Text {
            if io.terminal {
                bar.get_or_insert_with(|| RewrapBar::new(ProgressDrawTarget::stdout()))
                    .show(&w);
            } else {
                writeln!(io.out, "{}", rewrap_line(&w))?;
                io.out.flush()?;
            }
        }
        tokio::time::sleep(args.interval).await;
    };
    if let Some(bar) = bar {
        // The summary below has the final state.
        bar.0.finish_and_clear();
    }
    let w = r.rewrap.unwrap_or_default();
    match io.output {
        Output::Json => {
            let keks: Vec<_> = r
                .keks
                .iter()
                .map(|k| {
                    json!({
                        "kek_id": k.kek_id,
                        "label": k.label,
                        "role": k.role,
                        "created_unix_ms": (k.created_unix_ms != 0).then_some(k.created_unix_ms),
                        "deks": k.deks,
                        "encryptions": k.encryptions,
                    })
                })
                .collect();
            let total = w.moved + w.remaining;
            output::json(
                io.out,
                &json!({
                    "keks": keks,
                    "rewrap": {
                        "remaining": w.remaining,
                        "moved": w.moved,
                        "percent_done": percent(w.moved, total),
                        "rate_per_second": w.rate_per_second,
                        "eta_seconds": (w.eta_seconds >= 0).then_some(w.eta_seconds),
                        "replicas": w.replicas,
                        "last_batch_unix_ms": (w.last_batch_unix_ms != 0).then_some(w.last_batch_unix_ms),
                        "unknown_kek_deks": w.unknown_kek_deks,
                    },
                    "auto_rotation": r.auto_rotation,
                }),
            )?
        }
        Output::Text => {
            if r.keks.is_empty() {
                writeln!(
                    io.err,
                    "the broker has no KEK: create one with `brokerctl keys init`"
                )?;
            }
            let rows: Vec<Vec<String>> = r
                .keks
                .iter()
                .map(|k| {
                    vec![
                        k.kek_id.clone(),
                        k.label.clone(),
                        k.role.clone(),
                        time_ms(k.created_unix_ms),
                        k.deks.to_string(),
                        k.encryptions.to_string(),
                    ]
                })
                .collect();
            table(
                io.out,
                &["KEK_ID", "LABEL", "ROLE", "CREATED", "DEKS", "ENCRYPTIONS"],
                &rows,
            )?;
            writeln!(io.out)?;
            if io.terminal && w.remaining > 0 {
                // The bar is drawn straight to stdout: what is buffered goes first.
                io.out.flush()?;
                let bar = RewrapBar::new(ProgressDrawTarget::stdout());
                bar.show(&w);
                bar.leave();
            } else {
                writeln!(io.out, "{}", rewrap_line(&w))?;
            }
            writeln!(io.out, "automatic rotation: {}", r.auto_rotation)?;
            if w.unknown_kek_deks > 0 {
                io.warn(&format!(
                    "{} DEK(s) are wrapped by a KEK that is not on the HSM token: they can be \
                     neither opened nor re-wrapped",
                    w.unknown_kek_deks
                ))?;
            }
        }
    }
    Ok(())
}

pub(super) fn percent(done: u64, total: u64) -> f64 {
    if total == 0 {
        100.0
    } else {
        (done as f64 * 1000.0 / total as f64).floor() / 10.0
    }
}

/// Re-wrap progress as one plain line (not a terminal: logs, pipes, `kubectl exec`).
pub(crate) fn rewrap_line(w: &pb::RewrapProgress) -> String {
    if w.remaining == 0 {
        return format!(
            "re-wrap: done, every live DEK is wrapped by the primary KEK ({} moved to it)",
            w.moved
        );
    }
    format!(
        "re-wrap: {} moved, {} to go ({:.1}% done){}",
        w.moved,
        w.remaining,
        percent(w.moved, w.moved + w.remaining),
        rate_and_eta(w)
    )
}

/// The broker's figures: its rate over the last minute (all replicas) and its ETA.
fn rate_and_eta(w: &pb::RewrapProgress) -> String {
    let mut s = if w.rate_per_second > 0.0 {
        format!(
            ", {:.0} DEKs/s from {} replica{}",
            w.rate_per_second,
            w.replicas,
            if w.replicas == 1 { "" } else { "s" }
        )
    } else {
        ", no batch in the last minute".to_owned()
    };
    if w.eta_seconds >= 0 {
        s.push_str(&format!(", ETA {}", secs(w.eta_seconds.unsigned_abs())));
    } else {
        s.push_str(", ETA unknown");
    }
    s
}

/// Re-wrap progress as an `indicatif` bar (on a terminal): DEKs moved out of moved + to go,
/// then the counts and the broker's rate and ETA (not indicatif's: the broker knows what
/// every replica does).
pub(crate) struct RewrapBar(pub(crate) ProgressBar);

impl RewrapBar {
    /// The bar line: `re-wrap: [#######-----------------------]  25.0%  250 moved, ...`.
    pub(crate) const TEMPLATE: &'static str = "re-wrap: [{bar:30}] {percent_done}%  {msg}";

    /// A bar drawing to `target` (nothing is drawn before [`RewrapBar::show`]).
    pub(crate) fn new(target: ProgressDrawTarget) -> RewrapBar {
        let bar = ProgressBar::with_draw_target(Some(0), target);
        // A fixed template that parses (the tests draw it); else indicatif's default style.
        if let Ok(style) = ProgressStyle::with_template(Self::TEMPLATE) {
            bar.set_style(
                style
                    .with_key(
                        "percent_done",
                        |s: &ProgressState, out: &mut dyn std::fmt::Write| {
                            // As the plain line and `-o json` count it (tenths, rounded down).
                            let _ = write!(out, "{:5.1}", percent(s.pos(), s.len().unwrap_or(0)));
                        },
                    )
                    .progress_chars("#-"),
            );
        }
        RewrapBar(bar)
    }

    /// Sets the bar to `w` and draws it.
    pub(crate) fn show(&self, w: &pb::RewrapProgress) {
        self.0.set_message(format!(
            "{} moved, {} to go{}",
            w.moved,
            w.remaining,
            rate_and_eta(w)
        ));
        self.0.update(|s| {
            s.set_len(w.moved + w.remaining);
            s.set_pos(w.moved);
        });
        // Asks are seconds apart: never let the draw rate limit hold back the last state.
        self.0.force_draw();
    }

    /// Stops drawing and leaves the last line as it is (`finish` would show 100%).
    pub(crate) fn leave(&self) {
        self.0.abandon();
    }
}

/// `brokerctl keys rotate`.
pub async fn key_rotate(conn: &ConnArgs, io: &mut Io<'_>) -> Result<(), CtlError> {
    let r = Session::open(conn)
        .await?
        .admin
        .rotate_key(pb::RotateKeyRequest {})
        .await
        .map_err(CtlError::remote("RotateKey"))?
        .into_inner();
    match io.output {
        Output::Json => output::json(
            io.out,
            &json!({
                "kek_id": r.kek_id,
                "label": r.label,
                "previous_kek_id": (!r.previous_kek_id.is_empty()).then_some(&r.previous_kek_id),
                "deks_to_rewrap": r.deks_to_rewrap,
            }),
        )?,
        Output::Text => {
            writeln!(
                io.err,
                "created broker KEK {}: it is the primary now; {} DEK(s) under older KEKs are \
                 re-wrapped to it in the background (watch `brokerctl keys status`)",
                r.label, r.deks_to_rewrap
            )?;
            writeln!(io.out, "{}", r.kek_id)?;
        }
    }
    Ok(())
}

/// `brokerctl keys retire <id> --yes`.
pub async fn key_retire(
    conn: &ConnArgs,
    args: &RetireArgs,
    io: &mut Io<'_>,
) -> Result<(), CtlError> {
    let id = args.kek_id.trim();
    if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Usage(format!(
            "'{}' is not a KEK id: 32 hex digits, as `brokerctl keys status` shows",
            id.escape_debug()
        ))
        .into());
    }
    if !args.yes {
        return Err(Usage(format!(
            "`keys retire` destroys KEK {id} in the HSM: anything still wrapped by it (an old \
             database backup, say) can never be opened again. Check `brokerctl keys status` \
             (role decrypt-only, DEKS 0), then add --yes"
        ))
        .into());
    }
    let r = Session::open(conn)
        .await?
        .admin
        .retire_key(pb::RetireKeyRequest {
            kek_id: id.to_ascii_lowercase(),
        })
        .await
        .map_err(CtlError::remote("RetireKey"))?
        .into_inner();
    match io.output {
        Output::Json => output::json(
            io.out,
            &json!({"kek_id": r.kek_id, "label": r.label, "retired": true}),
        )?,
        Output::Text => writeln!(
            io.out,
            "retired (destroyed in the HSM) broker KEK {} ({})",
            r.kek_id, r.label
        )?,
    }
    Ok(())
}
