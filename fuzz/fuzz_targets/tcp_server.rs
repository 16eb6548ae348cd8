//! The TCP server's frame handling, driven by arbitrary byte streams: one
//! connection per input, served exactly as the accept loop serves a peer's
//! (`TcpServer::serve_connection`), against an engine endpoint with one
//! registered region and guard bytes on both sides of it.
//!
//! Input: the first byte chooses whether a valid Hello (this engine's token)
//! goes first, so that the fuzzer reaches the frames after the handshake;
//! every `KEY!KEY!` in the input becomes the region's real access key and
//! every `ADDR!ADR` its address, so Writes and ReadReqs can name memory that
//! exists. Checked per input: no panic, no hang (the stream ends), the guard
//! bytes around the region never change, and the server answers only with
//! well-formed frames.
#![no_main]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{FromRawFd, IntoRawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use plugin_Mooncake::common::{AgentName, Endpoint, Inbox, Registry};
use plugin_Mooncake::transport::tcp::TcpServer;
use plugin_Mooncake::wire::frame::{HEADER_LEN, Header, Hello, Kind};

const REGION: usize = 64 << 10;
const GUARD: usize = 4096;
const GUARD_BYTE: u8 = 0xA5;

struct World {
    endpoint: Arc<Endpoint>,
    server: Arc<TcpServer>,
    /// Address of guard | region | guard (leaked); only the middle is
    /// registered, and the server writes it through raw pointers.
    memory: usize,
    key: u64,
    drainer: Drainer,
}

/// A thread that reads everything the server answers on a connection (so
/// that the server never blocks on a full socket), kept for all inputs.
struct Drainer(Mutex<mpsc::Sender<(UnixStream, mpsc::Sender<Vec<u8>>)>>);

impl Drainer {
    fn start() -> Drainer {
        let (tx, rx) = mpsc::channel::<(UnixStream, mpsc::Sender<Vec<u8>>)>();
        std::thread::spawn(move || {
            for (mut s, back) in rx {
                let mut answers = Vec::new();
                let _ = s.read_to_end(&mut answers);
                let _ = back.send(answers);
            }
        });
        Drainer(Mutex::new(tx))
    }

    /// Starts reading `s` to its end; the receiver gets what was read.
    fn drain(&self, s: UnixStream) -> mpsc::Receiver<Vec<u8>> {
        let (back, answers) = mpsc::channel();
        self.0
            .lock()
            .expect("the drainer's channel")
            .send((s, back))
            .expect("the drainer runs");
        answers
    }
}

impl World {
    fn base(&self) -> u64 {
        (self.memory + GUARD) as u64
    }

    /// The guard bytes, read while no server call runs.
    fn guards_intact(&self) -> bool {
        // SAFETY: `memory` is a leaked allocation of GUARD + REGION + GUARD
        // bytes that lives for the process; `serve_connection` has returned,
        // so nothing writes it while we read.
        let all =
            unsafe { std::slice::from_raw_parts(self.memory as *const u8, GUARD + REGION + GUARD) };
        all[..GUARD]
            .iter()
            .chain(&all[GUARD + REGION..])
            .all(|&b| b == GUARD_BYTE)
    }
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        // SAFETY: plain signal disposition change, before any thread of ours
        // writes to a socket whose other end may be closed.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        let endpoint = Arc::new(Endpoint {
            name: AgentName::from("fuzz-target"),
            token: 0x1234_5678_9abc_def0_0fed_cba9_8765_4321,
            registry: Registry::default(),
            inbox: Inbox::with_limits(1 << 20, 256 << 10),
            peers: Default::default(),
        });
        let memory = vec![GUARD_BYTE; GUARD + REGION + GUARD].leak().as_mut_ptr() as usize;
        let region = endpoint
            .registry
            .register((memory + GUARD) as u64, REGION as u64, 0, 0)
            .expect("register the fuzz region");
        let server = TcpServer::start(
            endpoint.clone(),
            "127.0.0.1:0".parse().expect("an address"),
            Duration::from_millis(200),
            Duration::ZERO,
        )
        .expect("start the server");
        World {
            endpoint,
            server,
            memory,
            key: region.key,
            drainer: Drainer::start(),
        }
    })
}

fn replace_all(data: &mut [u8], from: &[u8; 8], to: [u8; 8]) {
    let mut i = 0;
    while i + 8 <= data.len() {
        if &data[i..i + 8] == from {
            data[i..i + 8].copy_from_slice(&to);
            i += 8;
        } else {
            i += 1;
        }
    }
}

/// Checks that `answers` is a sequence of well-formed frames (the last may be
/// cut off where the server closed in the middle of a read response).
fn check_answers(answers: &[u8]) {
    let mut at = 0;
    while let Some(raw) = answers[at..].first_chunk::<HEADER_LEN>() {
        let h = Header::decode(raw).expect("the server sent a malformed header");
        assert!(
            matches!(
                h.kind,
                Kind::HelloOk
                    | Kind::WriteAck
                    | Kind::ReadResp
                    | Kind::NotifRefused
                    | Kind::NotifAck
                    | Kind::ControlResp
            ),
            "the server sent a {:?} frame",
            h.kind
        );
        at += HEADER_LEN + h.body_len as usize;
        if at > answers.len() {
            assert_eq!(h.kind, Kind::ReadResp, "a cut-off {:?} frame", h.kind);
            return;
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let w = world();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut input = Vec::with_capacity(data.len() + 64);
    if mode & 1 == 0 {
        let hello = Hello {
            target_token: w.endpoint.token,
            sender_token: 7,
            name: b"fuzz-peer".to_vec(),
        }
        .encode();
        input.extend_from_slice(&Header::new(Kind::Hello, hello.len() as u32, 0, 0).encode());
        input.extend_from_slice(&hello);
    }
    let start = input.len();
    input.extend_from_slice(rest);
    replace_all(&mut input[start..], b"KEY!KEY!", w.key.to_le_bytes());
    replace_all(&mut input[start..], b"ADDR!ADR", w.base().to_le_bytes());

    let (mut client, served) = UnixStream::pair().expect("a socket pair");
    // SAFETY: the fd is a connected stream socket we own; the server only
    // reads, writes, polls and shuts it down, which a Unix stream socket
    // supports (TCP-only options fail and are ignored).
    let served = unsafe { TcpStream::from_raw_fd(served.into_raw_fd()) };
    // The whole input fits the socket's buffer (inputs are at most 16 KiB):
    // written before serving, so no thread is needed to feed it.
    client.write_all(&input).expect("write the input");
    client.shutdown(Shutdown::Write).expect("end the input");
    let answers = w.drainer.drain(client);
    w.server.serve_connection(
        &served,
        "127.0.0.1:9".parse().expect("an address"),
        &w.endpoint,
    );
    let _ = served.shutdown(Shutdown::Both);
    drop(served);
    let answers = answers.recv().expect("the drainer's answers");
    check_answers(&answers);
    let _ = w.endpoint.inbox.drain();
    assert!(
        w.guards_intact(),
        "a byte outside the registered region changed"
    );
});
