//! `GET /`: the web page. Plain HTML, CSS and JavaScript compiled into the binary, no build
//! step: the product list with live stock, a Buy button per product, each purchase followed
//! from pending to its order number or rejection, and a live counter of orders.

use axum::response::Html;

/// The page (`api/src/page/index.html`).
const INDEX: &str = include_str!("../page/index.html");

pub async fn index() -> Html<&'static str> {
    Html(INDEX)
}
