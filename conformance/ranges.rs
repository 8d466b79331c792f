//! Range reads (`open_blob` with a range: part of the `open_blob` capability).

use super::*;

pub(super) async fn read_range(
    cache: &Backend,
    r: &CacheRef,
    range: ByteRange,
) -> Result<Option<Bytes>, Failure> {
    let Some(mut stream) = cache.open_blob(&r.reference, Some(range.clone())).await? else {
        return Ok(None);
    };
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        ensure!(
            chunk.len() <= MAX_READ_CHUNK,
            "{range}: a chunk of {} bytes",
            chunk.len()
        );
        out.extend_from_slice(&chunk);
    }
    Ok(Some(out.into()))
}

/// Ranges at the start, across chunk boundaries in the middle, at the end, clamped past the end, by
/// offset and by suffix read exactly those bytes.
pub async fn range_reads_start_middle_end(cache: Backend) -> CaseResult {
    gate!(cache, &[Cap::WriteBlob, Cap::OpenBlob]);
    let data = pattern(3 * MAX_READ_CHUNK + 123, 21);
    let r = write(&cache, &data, 100_000).await?;
    let n = data.len() as u64;
    let cases: Vec<(ByteRange, std::ops::Range<u64>)> = vec![
        (ByteRange::Bounded(0..10), 0..10),
        (ByteRange::Bounded(1000..300_000), 1000..300_000),
        (ByteRange::Bounded(262_143..262_145), 262_143..262_145),
        (
            ByteRange::Bounded(MAX_READ_CHUNK as u64 - 7..2 * MAX_READ_CHUNK as u64 + 9),
            MAX_READ_CHUNK as u64 - 7..2 * MAX_READ_CHUNK as u64 + 9,
        ),
        (ByteRange::Bounded(n - 5..n), n - 5..n),
        (ByteRange::Bounded(n - 5..n + 100), n - 5..n),
        (ByteRange::Offset(n - 1000), n - 1000..n),
        (ByteRange::Offset(0), 0..n),
        (ByteRange::Suffix(777), n - 777..n),
        (ByteRange::Suffix(n + 10), 0..n),
    ];
    for (range, span) in cases {
        let got = read_range(&cache, &r, range.clone()).await?;
        let want = data.slice(span.start as usize..span.end as usize);
        ensure!(
            got.as_ref() == Some(&want),
            "{range}: got {:?} bytes, expected {}",
            got.map(|g| g.len()),
            want.len()
        );
    }
    Ok(())
}

/// Empty ranges read nothing; ranges past the end are a clear `InvalidRange`; unknown refs are `None`.
pub async fn open_blob_range_empty_and_past_the_end(cache: Backend) -> CaseResult {
    gate!(cache, &[Cap::WriteBlob, Cap::OpenBlob]);
    let data = pattern(10_000, 22);
    let r = write(&cache, &data, 1000).await?;
    let n = data.len() as u64;
    for empty in [
        ByteRange::Bounded(5..5),
        ByteRange::Offset(n),
        ByteRange::Suffix(0),
    ] {
        let got = read_range(&cache, &r, empty.clone()).await?;
        ensure!(
            got.as_ref().is_some_and(|g| g.is_empty()),
            "{empty}: got {got:?}"
        );
    }
    for bad in [
        ByteRange::Bounded(n + 1..n + 2),
        ByteRange::Offset(n + 1),
        #[allow(clippy::reversed_empty_ranges)] // deliberately backwards
        ByteRange::Bounded(10..5),
    ] {
        match cache.open_blob(&r.reference, Some(bad.clone())).await {
            Err(Error::InvalidRange {
                ref reference,
                size,
                ..
            }) if *reference == r.reference && size == n => {}
            Err(e) => return Err(Failure(format!("{bad}: expected InvalidRange, got {e}"))),
            Ok(s) => {
                return Err(Failure(format!(
                    "{bad}: expected InvalidRange, got a stream: {}",
                    s.is_some()
                )));
            }
        }
    }
    let unknown = mutate_last_hex_digit(&r.reference).unwrap_or_default();
    ensure!(
        cache
            .open_blob(&unknown, Some(ByteRange::Offset(0)))
            .await?
            .is_none(),
        "unknown ref resolved"
    );
    Ok(())
}
