//! A TCP proxy a test can cut: put it between allot and one of its services, and an outage of
//! that service, for that allot alone, is one call away ([`Proxy::cut`]), without stopping a
//! service other tests share. Cut, it drops every connection it carries and every new one at
//! once (a service that is down); restored, it forwards again. It can also hold back what the
//! service answers ([`Proxy::hold_replies`]) while still delivering what it is sent: a broker
//! that stores a message and whose confirm never arrives in time.

use anyhow::{Context as _, Result};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A running proxy on `127.0.0.1:<port>`; stops when dropped: every connection it carries is
/// dropped and its port closed (new connections are refused), as when the service stops.
pub struct Proxy {
    addr: SocketAddr,
    open: Arc<AtomicBool>,
    cuts: watch::Sender<u64>,
    /// `true` while the service's replies are held back.
    held: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Forwards a fresh port of 127.0.0.1 to `upstream` (`host:port`).
    pub async fn start(upstream: String) -> Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the proxy")?;
        Proxy::on(listener, upstream)
    }

    /// Forwards what `listener` accepts to `upstream` (`host:port`): for a port chosen before
    /// the service behind it comes up.
    pub fn on(listener: TcpListener, upstream: String) -> Result<Proxy> {
        let addr = listener.local_addr()?;
        let open = Arc::new(AtomicBool::new(true));
        let (cuts, cut) = watch::channel(0u64);
        let (held, hold) = watch::channel(false);
        let task = tokio::spawn(accept(listener, upstream, open.clone(), cut, hold));
        Ok(Proxy {
            addr,
            open,
            cuts,
            held,
            task,
        })
    }

    /// A proxy in front of the service of `url` (`scheme://[user@]host:port/...`); returns it
    /// and the same URL pointing at the proxy.
    pub async fn in_front_of(url: &str) -> Result<(Proxy, String)> {
        let mut parsed =
            reqwest::Url::parse(url).with_context(|| format!("invalid URL {url:?}"))?;
        let host = parsed
            .host_str()
            .context("the URL names a host")?
            .to_owned();
        let port = parsed.port().context("the URL names a port")?;
        let proxy = Proxy::start(format!("{host}:{port}")).await?;
        parsed
            .set_port(Some(proxy.addr.port()))
            .map_err(|()| anyhow::anyhow!("{url:?} cannot take a port"))?;
        Ok((proxy, parsed.to_string()))
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The service is down: every connection is dropped, and so is every new one.
    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        self.cuts.send_modify(|cuts| *cuts += 1);
    }

    /// The service is back.
    pub fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }

    /// From now on the service's replies wait in the proxy (what is sent to it still arrives).
    pub fn hold_replies(&self) {
        self.held.send_replace(true);
    }

    /// The held replies, and every later one, are delivered.
    pub fn release_replies(&self) {
        self.held.send_replace(false);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

async fn accept(
    listener: TcpListener,
    upstream: String,
    open: Arc<AtomicBool>,
    cut: watch::Receiver<u64>,
    hold: watch::Receiver<bool>,
) {
    while let Ok((inbound, _)) = listener.accept().await {
        if !open.load(Ordering::SeqCst) {
            continue; // dropped: the connection closes at once
        }
        let upstream = upstream.clone();
        let mut cut = cut.clone();
        cut.mark_unchanged();
        let hold = hold.clone();
        tokio::spawn(async move {
            let Ok(outbound) = TcpStream::connect(&upstream).await else {
                return;
            };
            let (mut from_client, mut to_client) = inbound.into_split();
            let (mut from_service, mut to_service) = outbound.into_split();
            let requests = tokio::io::copy(&mut from_client, &mut to_service);
            let replies = forward_unless_held(&mut from_service, &mut to_client, hold);
            tokio::select! {
                _ = requests => {}
                _ = replies => {}
                _ = cut.changed() => {} // both sockets are dropped
            }
        });
    }
}

/// Copies `from` to `to`, each chunk once the replies are not held.
async fn forward_unless_held(
    from: &mut (impl AsyncRead + Unpin),
    to: &mut (impl AsyncWrite + Unpin),
    mut hold: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let read = from.read(&mut buffer).await?;
        if read == 0 {
            return Ok(());
        }
        if hold.wait_for(|held| !held).await.is_err() {
            return Ok(()); // the proxy is gone
        }
        to.write_all(&buffer[..read]).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server behind the proxy: echoed while open, dropped when cut, echoed again
    /// once restored.
    #[tokio::test]
    async fn a_cut_drops_every_connection_until_restored() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let (mut read, mut write) = socket.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                });
            }
        });
        let proxy = Proxy::start(echo_addr.to_string()).await.unwrap();
        let round_trip = |addr: SocketAddr| async move {
            let mut socket = TcpStream::connect(addr).await.ok()?;
            socket.write_all(b"ping").await.ok()?;
            let mut answer = [0u8; 4];
            socket.read_exact(&mut answer).await.ok()?;
            Some(answer)
        };
        assert_eq!(round_trip(proxy.addr()).await, Some(*b"ping"));

        let mut held = TcpStream::connect(proxy.addr()).await.unwrap();
        held.write_all(b"ping").await.unwrap();
        let mut answer = [0u8; 4];
        held.read_exact(&mut answer).await.unwrap();
        proxy.cut();
        let mut rest = Vec::new();
        let read = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            held.read_to_end(&mut rest),
        )
        .await
        .expect("a cut connection is closed at once");
        assert!(read.is_err() || rest.is_empty(), "nothing more arrives");
        assert_eq!(round_trip(proxy.addr()).await, None);

        proxy.restore();
        assert_eq!(round_trip(proxy.addr()).await, Some(*b"ping"));

        // Held: the request arrives (echoed), its answer waits until released.
        let mut socket = TcpStream::connect(proxy.addr()).await.unwrap();
        proxy.hold_replies();
        socket.write_all(b"ping").await.unwrap();
        let mut answer = [0u8; 4];
        let early = tokio::time::timeout(
            std::time::Duration::from_millis(300),
            socket.read_exact(&mut answer),
        )
        .await;
        assert!(early.is_err(), "no reply while held");
        proxy.release_replies();
        socket.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"ping");
    }
}
