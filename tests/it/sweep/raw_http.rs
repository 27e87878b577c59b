//! A raw HTTP/1.1 client: the sweep sends bytes reqwest would refuse or normalise (bytes that
//! are not UTF-8 in the request target, duplicate or missing headers, any method name).

use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One request, as bytes.
#[derive(Debug, Clone)]
pub struct RawRequest {
    pub method: String,
    /// The request target as sent (path and query), not necessarily valid UTF-8.
    pub target: Vec<u8>,
    /// Headers besides `host`, `connection` and `content-length`, which are always sent.
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

/// What came back.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    /// Names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

impl RawRequest {
    /// How a failing probe is shown: printable, bytes escaped.
    pub fn describe(&self) -> String {
        let headers: Vec<String> = self
            .headers
            .iter()
            .map(|(name, value)| format!("{name}: {}", value.escape_ascii()))
            .collect();
        let body = if self.body.len() > 300 {
            format!(
                "{}... ({} bytes)",
                self.body[..300].escape_ascii(),
                self.body.len()
            )
        } else {
            self.body.escape_ascii().to_string()
        };
        format!(
            "{} {} [{}] {body}",
            self.method,
            self.target.escape_ascii(),
            headers.join("; ")
        )
    }
}

/// Sends `request` on a fresh connection (`Connection: close`) and reads the response.
pub async fn send(address: &str, request: &RawRequest) -> Result<RawResponse, String> {
    let mut stream = TcpStream::connect(address)
        .await
        .map_err(|err| format!("connect: {err}"))?;
    let mut bytes = Vec::with_capacity(256 + request.body.len());
    bytes.extend_from_slice(request.method.as_bytes());
    bytes.push(b' ');
    bytes.extend_from_slice(&request.target);
    bytes.extend_from_slice(b" HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n");
    for (name, value) in &request.headers {
        bytes.extend_from_slice(name.as_bytes());
        bytes.extend_from_slice(b": ");
        bytes.extend_from_slice(value);
        bytes.extend_from_slice(b"\r\n");
    }
    bytes.extend_from_slice(format!("content-length: {}\r\n\r\n", request.body.len()).as_bytes());
    bytes.extend_from_slice(&request.body);
    // The server may answer (413) and close before reading a large body: a failed write is
    // not an error as long as a response comes back.
    let _ = stream.write_all(&bytes).await;
    let mut received = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buffer = [0u8; 8192];
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) => return Ok(()),
                Ok(n) => received.extend_from_slice(&buffer[..n]),
                // A reset after the response was sent (the body we were still writing).
                Err(_) if !received.is_empty() => return Ok(()),
                Err(err) => return Err(format!("read: {err}")),
            }
            if let Some(done) = complete(&received)
                && done
            {
                return Ok(());
            }
        }
    })
    .await;
    match read {
        Ok(Ok(())) => {}
        Ok(Err(err)) => return Err(err),
        Err(_) => {
            return Err(format!(
                "no complete response within 10 s; received {}",
                received.escape_ascii()
            ));
        }
    }
    parse(&received)
}

/// `Some(true)` once the head and a `content-length` body are complete.
fn complete(received: &[u8]) -> Option<bool> {
    let end = find(received, b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&received[..end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))?
        .trim()
        .parse()
        .ok()?;
    Some(received.len() >= end + 4 + length)
}

fn parse(received: &[u8]) -> Result<RawResponse, String> {
    let end = find(received, b"\r\n\r\n")
        .ok_or_else(|| format!("no response head in {}", received.escape_ascii()))?;
    let head = String::from_utf8_lossy(&received[..end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    Ok(RawResponse {
        status,
        headers,
        body: received[end + 4..].to_vec(),
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}
