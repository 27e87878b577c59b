//! Keyset pagination by id, as the catalogue and the slots are listed: up to `limit` rows
//! (1 to [`MAX_LIMIT`], [`DEFAULT_LIMIT`] when absent) whose id is above `after`; a full page
//! names its last id as `next_after`, the next page's `after`.

use crate::error::ApiError;

/// The page size without `limit`.
pub const DEFAULT_LIMIT: i64 = 100;
/// The largest page.
pub const MAX_LIMIT: i64 = 1000;

/// The page size asked for, checked.
pub fn limit(requested: Option<i64>) -> Result<i64, ApiError> {
    let limit = requested.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::InvalidQuery(format!(
            "limit must be between 1 and {MAX_LIMIT}, got {limit}"
        )));
    }
    Ok(limit)
}

/// The `after` of the next page: the last row's id if the page is full, else `None` (the last
/// page; a full last page costs one more, empty, request).
pub fn next_after<T>(rows: &[T], limit: i64, id: impl Fn(&T) -> i64) -> Option<i64> {
    (rows.len() as i64 == limit)
        .then(|| rows.last().map(id))
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_outside_1_to_1000_are_refused_and_absent_is_100() {
        assert_eq!(limit(None).unwrap(), 100);
        assert_eq!(limit(Some(1)).unwrap(), 1);
        assert_eq!(limit(Some(1000)).unwrap(), 1000);
        for refused in [0, -1, 1001, i64::MAX] {
            assert!(limit(Some(refused)).is_err(), "{refused}");
        }
    }

    #[test]
    fn only_a_full_page_names_a_next_one() {
        assert_eq!(next_after(&[3_i64, 7], 2, |id| *id), Some(7));
        assert_eq!(next_after(&[3_i64], 2, |id| *id), None);
        assert_eq!(next_after::<i64>(&[], 2, |id| *id), None);
    }
}
