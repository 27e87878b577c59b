//! Test fixtures shared by the unit tests: [`good_observation`], a run that did everything
//! right, for a test to break in one place, and helpers around it.

use std::collections::HashMap;
use std::time::Duration;

use chrono::NaiveDate;
use uuid::Uuid;

use crate::check::Observation;
use crate::client::{Accept, Polled};
use allot_tests::client::Transaction;
use allot_tests::client::wire::{OUT_OF_STOCK, REJECTED, SUCCEEDED};

pub fn date(y: i32, m: u32, d: u32) -> NaiveDate {
    NaiveDate::from_ymd_opt(y, m, d).expect("valid test date")
}

const TODAY: (i32, u32, u32) = (2025, 3, 14);

fn transaction(id: Uuid, user_id: i64, product_id: i64, status: &str) -> Transaction {
    Transaction {
        transaction_id: id.to_string(),
        status: status.to_owned(),
        user_id,
        product_id,
        quantity: 1,
        order_number: None,
        reason: None,
    }
}

/// A run of size `n` that did everything right: the first half succeeded, the rest were
/// rejected as out of stock.
pub fn good_observation(n: usize) -> Observation {
    let product_id = 42;
    let stock = n / 2;
    let mut accepts = Vec::new();
    let mut finals = HashMap::new();
    for (i, user_id) in (1..=n as i64).enumerate() {
        let id = Uuid::new_v4();
        accepts.push(Accept {
            user_id,
            outcome: Ok(id),
            sold_out: false,
        });
        let mut tx = transaction(id, user_id, product_id, REJECTED);
        if i < stock {
            tx.status = SUCCEEDED.to_owned();
            tx.order_number = Some(format!("20250314-{:05}", i + 1));
        } else {
            tx.reason = Some(OUT_OF_STOCK.to_owned());
        }
        finals.insert(id, tx);
    }
    let today = date(TODAY.0, TODAY.1, TODAY.2);
    Observation {
        n,
        product_id,
        stock,
        accepts,
        polled: Polled {
            finals,
            all_decided_after: Some(Duration::from_millis(1500)),
            ..Polled::default()
        },
        final_stock: Ok(0),
        valid_dates: [today, today],
        deadline: Duration::from_secs(120),
    }
}

/// The transaction of the `i`-th request.
pub fn tx_mut(observation: &mut Observation, i: usize) -> &mut Transaction {
    let id = *observation.accepts[i].outcome.as_ref().expect("accepted");
    observation
        .polled
        .finals
        .get_mut(&id)
        .expect("decided transaction")
}
