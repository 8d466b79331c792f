//! Row storage: point reads, decoding, the one-pass scan with unreadable rows apart, ownership of refs.

use super::*;

pub(super) fn read_row(conn: &Connection, key: &RowKey) -> rusqlite::Result<Option<(String, i64)>> {
    conn.prepare_cached(
        "SELECT output, created_at FROM rows WHERE task_type = ?1 AND fingerprint = ?2",
    )?
    .query_row(params![key.task_type(), key.fingerprint()], |r| {
        Ok((r.get(0)?, r.get(1)?))
    })
    .optional()
}

pub(super) fn decode_row(
    cache: &SqliteCache,
    key: &RowKey,
    found: rusqlite::Result<Option<(String, i64)>>,
) -> Result<Option<Row>> {
    let Some((text, created)) = found.map_err(cache.err(format!("get row {key}")))? else {
        return Ok(None);
    };
    let output = serde_json::from_str(&text).map_err(|e| Error::CorruptRow {
        task_type: key.task_type().into(),
        fingerprint: key.fingerprint().into(),
        reason: format!("stored output is not valid JSON: {e}"),
    })?;
    Ok(Some(Row {
        output,
        created_at: from_ms(created),
    }))
}

/// Why a stored row cannot be used, or `None` if it can: a bad key, a refs column that is not a JSON
/// list of strings, or an output that is not valid JSON.
pub(super) fn corruption(task: &str, fp: &str, refs: &str, output_valid: bool) -> Option<String> {
    if let Err(e) = RowKey::from_parts(task, fp) {
        return Some(e.to_string());
    }
    if let Err(e) = serde_json::from_str::<Vec<String>>(refs) {
        return Some(format!("refs column is not a JSON list: {e}"));
    }
    (!output_valid).then(|| "stored output is not valid JSON".to_owned())
}

/// Every row as a listing entry or, if it cannot be used, as a corrupt entry (id: its rowid).
pub(super) fn scan_rows(
    cache: &SqliteCache,
    conn: &Connection,
) -> Result<(Vec<RowEntry>, Vec<CorruptEntry>)> {
    let mut stmt = conn
        .prepare(
            "SELECT rowid, task_type, fingerprint, created_at, size, refs, last_access, json_valid(output)
             FROM rows",
        )
        .map_err(cache.err("list rows"))?;
    let mut rows_out = Vec::new();
    let mut corrupt = Vec::new();
    let mut rows = stmt.query([]).map_err(cache.err("list rows"))?;
    while let Some(r) = rows.next().map_err(cache.err("list rows"))? {
        let err = |e| cache.err("list rows")(e);
        let rowid: i64 = r.get(0).map_err(err)?;
        let (task, fp): (String, String) = (r.get(1).map_err(err)?, r.get(2).map_err(err)?);
        let (created, size): (i64, i64) = (r.get(3).map_err(err)?, r.get(4).map_err(err)?);
        let refs: String = r.get(5).map_err(err)?;
        let (accessed, valid): (i64, bool) = (r.get(6).map_err(err)?, r.get(7).map_err(err)?);
        if let Some(reason) = corruption(&task, &fp, &refs, valid) {
            corrupt.push(CorruptEntry {
                id: rowid.to_string(),
                reason,
                size: size.max(0) as u64,
                kind: crate::store::CorruptKind::Garbled,
            });
            continue;
        }
        rows_out.push(RowEntry {
            key: RowKey::from_parts(&task, &fp)?,
            created_at: from_ms(created),
            size: size.max(0) as u64,
            refs: serde_json::from_str(&refs).unwrap_or_default(),
            last_access: Some(from_ms(accessed)),
            version: None,
        });
    }
    Ok((rows_out, corrupt))
}

/// The refs in a row's `refs` column that the row `(task, fp)` owns (see [`crate::wire::ref_owned_by`]).
pub(super) fn owned_in_column(task: &str, fp: &str, refs: &str) -> Vec<String> {
    let Ok(key) = RowKey::from_parts(task, fp) else {
        return Vec::new();
    };
    let refs = serde_json::from_str::<Vec<String>>(refs).unwrap_or_default();
    crate::wire::owned_refs(&key, refs.iter().map(String::as_str))
}

/// The smallest string greater than every string that starts with `prefix` (`None`: no upper bound).
/// SQLite compares TEXT bytewise, and UTF-8 byte order is code point order.
pub(super) fn prefix_upper_bound(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let next = (last as u32 + 1..=char::MAX as u32).find_map(char::from_u32);
        if let Some(next) = next {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}
