//! Order numbers (`YYYYMMDD-nnnnn`): parsing one, and checking those of a run's succeeded
//! transactions for form, date and uniqueness.

use std::collections::HashMap;

use chrono::NaiveDate;
use uuid::Uuid;

use crate::check::grouped;

/// Parses an order number `YYYYMMDD-nnnnn` (a valid date, a dash, at least five digits) and
/// returns its date.
fn parse_order_number(order_number: &str) -> Result<NaiveDate, String> {
    let malformed = |why: &str| format!("{order_number:?} {why}");
    let (date, sequence) =
        (order_number.split_once('-')).ok_or_else(|| malformed("has no '-' after the date"))?;
    if date.len() != 8 || !date.bytes().all(|b| b.is_ascii_digit()) {
        return Err(malformed("does not start with an 8-digit date"));
    }
    if sequence.len() < 5 || !sequence.bytes().all(|b| b.is_ascii_digit()) {
        return Err(malformed("does not end in at least 5 digits"));
    }
    NaiveDate::parse_from_str(date, "%Y%m%d").map_err(|_| malformed("has no valid date"))
}

/// Checks that the order numbers of succeeded transactions are well formed, dated on one of
/// `valid_dates` and unique.
pub fn check_order_numbers(
    order_numbers: &[(&Uuid, &str)],
    valid_dates: &[NaiveDate],
) -> Vec<String> {
    let mut malformed = Vec::new();
    let mut wrong_date = Vec::new();
    let mut holders: HashMap<&str, Vec<&Uuid>> = HashMap::new();
    for &(id, number) in order_numbers {
        holders.entry(number).or_default().push(id);
        match parse_order_number(number) {
            Err(why) => malformed.push(format!("{id}: {why}")),
            Ok(date) if !valid_dates.contains(&date) => {
                wrong_date.push(format!("{id}: {number}"));
            }
            Ok(_) => {}
        }
    }
    let mut duplicates: Vec<String> = (holders.into_iter())
        .filter(|(_, ids)| ids.len() > 1)
        .map(|(number, ids)| format!("{number} given to {} transactions", ids.len()))
        .collect();
    duplicates.sort();
    let mut dates: Vec<String> = (valid_dates.iter())
        .map(|d| d.format("%Y%m%d").to_string())
        .collect();
    dates.dedup();
    [
        grouped("malformed order numbers", &malformed),
        grouped(
            &format!("order numbers not dated {}", dates.join(" or ")),
            &wrong_date,
        ),
        grouped("duplicate order numbers", &duplicates),
    ]
    .into_iter()
    .flatten()
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::date;

    #[test]
    fn order_numbers_parse() {
        assert_eq!(parse_order_number("20250314-00001"), Ok(date(2025, 3, 14)));
        assert_eq!(
            parse_order_number("20241231-1234567"),
            Ok(date(2024, 12, 31))
        );
        for bad in [
            "",
            "20250314",
            "20250314-",
            "20250314-0001",
            "20250314_00001",
            "2025031-00001",
            "202503144-00001",
            "20251314-00001",
            "20250230-00001",
            "2025O314-00001",
            "20250314-0000x",
            "20250314-00001-2",
            "20250314- 0001",
            "+2025031-00001",
            "20250314-٠٠٠٠١",
        ] {
            assert!(
                parse_order_number(bad).is_err(),
                "{bad:?} should be malformed"
            );
        }
    }
}
