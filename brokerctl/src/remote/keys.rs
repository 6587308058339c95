//! `brokerctl keys status | rotate | retire`.

use super::*;

/// `brokerctl keys status [--wait]`.
pub async fn key_status(
    conn: &ConnArgs,
    args: &KeyStatusArgs,
    io: &mut Io<'_>,
) -> Result<(), CtlError> {
    let mut s = Session::open(conn).await?;
    let mut drew_bar = false;
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
                write!(io.out, "\r\x1b[2K{}", rewrap_line(&w, true))?;
                drew_bar = true;
            } else {
                writeln!(io.out, "{}", rewrap_line(&w, false))?;
            }
            io.out.flush()?;
        }
        tokio::time::sleep(args.interval).await;
    };
    if drew_bar {
        writeln!(io.out)?;
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
            writeln!(io.out, "{}", rewrap_line(&w, io.terminal))?;
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

/// One line of re-wrap progress; with a progress bar when `bar`.
pub(crate) fn rewrap_line(w: &pb::RewrapProgress, bar: bool) -> String {
    const WIDTH: usize = 30;
    let total = w.moved + w.remaining;
    if w.remaining == 0 {
        return format!(
            "re-wrap: done, every live DEK is wrapped by the primary KEK ({} moved to it)",
            w.moved
        );
    }
    let pct = percent(w.moved, total);
    let mut line = String::from("re-wrap: ");
    if bar {
        let filled = ((pct / 100.0) * WIDTH as f64).floor() as usize;
        line.push('[');
        line.extend(std::iter::repeat_n('#', filled.min(WIDTH)));
        line.extend(std::iter::repeat_n('-', WIDTH - filled.min(WIDTH)));
        line.push_str(&format!("] {pct:5.1}%  "));
    }
    line.push_str(&format!("{} moved, {} to go", w.moved, w.remaining));
    if !bar {
        line.push_str(&format!(" ({pct:.1}% done)"));
    }
    if w.rate_per_second > 0.0 {
        line.push_str(&format!(
            ", {:.0} DEKs/s from {} replica{}",
            w.rate_per_second,
            w.replicas,
            if w.replicas == 1 { "" } else { "s" }
        ));
    } else {
        line.push_str(", no batch in the last minute");
    }
    if w.eta_seconds >= 0 {
        line.push_str(&format!(", ETA {}", secs(w.eta_seconds.unsigned_abs())));
    } else {
        line.push_str(", ETA unknown");
    }
    line
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
