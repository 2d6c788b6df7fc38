//! A TCP proxy on 127.0.0.1 whose behaviour a test switches while clients use it, to stand in
//! for an uplink that goes down in each of the ways real ones do: connections refused (nothing
//! listens), hanging (accepted, never answered), reset (accepted, then RST), answers lost on the
//! way back (the request reaches the target, its answer never reaches the client), and passing.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultMode {
    /// Bytes flow both ways to the target.
    Pass,
    /// Nothing listens on the port: connecting is refused.
    Refuse,
    /// Connections are accepted and read from, but never forwarded or answered.
    Hang,
    /// Connections are accepted and reset at once.
    Reset,
    /// Requests reach the target; once the target starts answering, the client's connection is
    /// reset and the answer dropped: the client cannot tell whether the target took the request.
    DropAnswers,
}

/// The proxy; it stops, with every connection through it, when dropped.
#[derive(Debug)]
pub struct FaultProxy {
    pub address: SocketAddr,
    mode: watch::Sender<FaultMode>,
    task: JoinHandle<()>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl FaultProxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `target`.
    pub async fn start(target: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await.context("failed to bind the fault proxy")?;
        let address = listener.local_addr()?;
        let (mode, modes) = watch::channel(FaultMode::Pass);
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let task = tokio::spawn(serve(listener, address, target, modes, Arc::clone(&connections)));
        Ok(Self { address, mode, task, connections })
    }

    /// Switches the behaviour for new connections; connections open now are cut (reset), as
    /// an uplink going down cuts them.
    pub fn set_mode(&self, mode: FaultMode) {
        if let Ok(mut connections) = self.connections.lock() {
            for connection in connections.drain(..) {
                connection.abort();
            }
        }
        let _ = self.mode.send(mode);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
        if let Ok(mut connections) = self.connections.lock() {
            for connection in connections.drain(..) {
                connection.abort();
            }
        }
    }
}

async fn serve(
    listener: TcpListener,
    address: SocketAddr,
    target: SocketAddr,
    mut modes: watch::Receiver<FaultMode>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
) {
    let mut listener_opt = Some(listener);
    loop {
        let mode = *modes.borrow_and_update();
        match (mode, &listener_opt) {
            (FaultMode::Refuse, Some(_)) => listener_opt = None,
            (FaultMode::Refuse, None) => {}
            (_, None) => {
                // The port was free a moment ago and nothing else binds loopback ports here.
                while listener_opt.is_none() {
                    match TcpListener::bind(address).await {
                        Ok(listener) => listener_opt = Some(listener),
                        Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
            }
            (_, Some(_)) => {}
        }
        let Some(listener) = &listener_opt else {
            if modes.changed().await.is_err() {
                return;
            }
            continue;
        };
        tokio::select! {
            changed = modes.changed() => if changed.is_err() { return },
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else { continue };
                let connection = tokio::spawn(handle(client, target, mode));
                if let Ok(mut connections) = connections.lock() {
                    connections.retain(|connection| !connection.is_finished());
                    connections.push(connection);
                }
            }
        }
    }
}

async fn handle(mut client: TcpStream, target: SocketAddr, mode: FaultMode) {
    match mode {
        FaultMode::Pass => {
            let Ok(mut upstream) = TcpStream::connect(target).await else {
                let _ = client.set_zero_linger();
                return;
            };
            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        }
        FaultMode::Hang => {
            // Read and drop whatever arrives, so the client's writes complete and it waits
            // for an answer that never comes.
            let mut sink = tokio::io::sink();
            let _ = tokio::io::copy(&mut client, &mut sink).await;
            std::future::pending::<()>().await;
        }
        FaultMode::DropAnswers => {
            let Ok(upstream) = TcpStream::connect(target).await else {
                let _ = client.set_zero_linger();
                return;
            };
            let (mut upstream_read, mut upstream_write) = upstream.into_split();
            {
                let (mut client_read, _client_write) = client.split();
                let forwarding = tokio::io::copy(&mut client_read, &mut upstream_write);
                let mut first_byte = [0u8; 1];
                let answered = tokio::io::AsyncReadExt::read(&mut upstream_read, &mut first_byte);
                tokio::select! {
                    _ = forwarding => {}
                    _ = answered => {}
                }
            }
            let _ = client.set_zero_linger();
        }
        FaultMode::Reset | FaultMode::Refuse => {
            let _ = client.set_zero_linger();
        }
    }
}
