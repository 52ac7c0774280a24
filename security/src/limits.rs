//! Connection limits of a listener: in total and per client address
//! (Kafka's `max.connections` and `max.connections.per.ip`). A permit is
//! held for a connection's life and given back when dropped; [`Admitted`]
//! carries it beside a connection's stream, and [`LimitedListener`] applies
//! the limits to a listener that axum serves.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use parking_lot::Mutex;

#[derive(Debug)]
pub struct ConnectionLimits {
    max_total: usize,
    max_per_ip: usize,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self::new(usize::MAX, usize::MAX)
    }
}

/// The limits every listener of a node takes (each listener counts its
/// own connections).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitSettings {
    pub max_total: usize,
    pub max_per_ip: usize,
}

impl Default for LimitSettings {
    fn default() -> Self {
        LimitSettings {
            max_total: usize::MAX,
            max_per_ip: usize::MAX,
        }
    }
}

impl LimitSettings {
    /// The counters of one listener.
    pub fn listener(&self) -> Arc<ConnectionLimits> {
        Arc::new(ConnectionLimits::new(self.max_total, self.max_per_ip))
    }
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Listener,
    Address,
}

impl ConnectionLimits {
    pub fn new(max_total: usize, max_per_ip: usize) -> Self {
        ConnectionLimits {
            max_total,
            max_per_ip,
            open: Mutex::new((0, HashMap::new())),
        }
    }

    /// A permit for one more connection from `ip`, if both limits allow.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnectionPermit, Refused> {
        let mut open = self.open.lock();
        if open.0 >= self.max_total {
            return Err(Refused::Listener);
        }
        let from_ip = open.1.entry(ip).or_default();
        if *from_ip >= self.max_per_ip {
            return Err(Refused::Address);
        }
        *from_ip += 1;
        open.0 += 1;
        Ok(ConnectionPermit {
            limits: self.clone(),
            ip,
        })
    }
}

/// One admitted connection.
#[derive(Debug)]
pub struct ConnectionPermit {
    limits: Arc<ConnectionLimits>,
    ip: IpAddr,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let mut open = self.limits.open.lock();
        open.0 = open.0.saturating_sub(1);
        if let Some(n) = open.1.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.1.remove(&self.ip);
            }
        }
    }
}

/// A connection's stream with the permit that admitted it (none where the
/// listener has no limits): dropping the stream gives the permit back.
#[derive(Debug)]
pub struct Admitted<S> {
    io: S,
    _permit: Option<ConnectionPermit>,
}

impl<S> Admitted<S> {
    pub fn new(io: S, permit: Option<ConnectionPermit>) -> Self {
        Admitted {
            io,
            _permit: permit,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.io
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Admitted<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Admitted<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// A listener whose connections beyond the limits are closed as soon as
/// they are accepted.
pub struct LimitedListener<L> {
    inner: L,
    limits: Arc<ConnectionLimits>,
}

impl<L> LimitedListener<L> {
    pub fn new(inner: L, limits: Arc<ConnectionLimits>) -> Self {
        LimitedListener { inner, limits }
    }
}

impl<L> axum::serve::Listener for LimitedListener<L>
where
    L: axum::serve::Listener<Addr = SocketAddr>,
{
    type Io = Admitted<L::Io>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (io, peer) = self.inner.accept().await;
            match self.limits.admit(peer.ip()) {
                Ok(permit) => return (Admitted::new(io, Some(permit)), peer),
                Err(why) => tracing::debug!(%peer, ?why, "connection refused: too many open"),
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_address_and_total_limits() {
        let limits = Arc::new(ConnectionLimits::new(3, 2));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = limits.admit(a).unwrap();
        let _a2 = limits.admit(a).unwrap();
        assert_eq!(limits.admit(a).unwrap_err(), Refused::Address);
        let _b1 = limits.admit(b).unwrap();
        assert_eq!(limits.admit(b).unwrap_err(), Refused::Listener);
        drop(a1);
        assert!(limits.admit(a).is_ok());
    }
}
