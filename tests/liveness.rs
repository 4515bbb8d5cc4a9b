//! A bus connection that dies silently (the publisher's host reset, a
//! partition, a NAT or firewall that forgot the connection: no FIN or RST
//! ever reaches the subscriber) with the real binaries over real TCP: the
//! subscriber notices from the missing PONGs, connects again, and counts
//! what it missed as a gap. The silent death is a proxy between them that
//! stops forwarding its connections, both ways, without closing them.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// A TCP proxy to `upstream`: its connections forward both ways until
/// [`Proxy::freeze`], after which they forward nothing and stay open;
/// connections made after that forward normally.
struct Proxy {
    port: u16,
    /// Connections accepted so far.
    accepted: Arc<AtomicU64>,
    /// Connections accepted while this was lower than it is now are frozen.
    generation: Arc<AtomicU64>,
}

impl Proxy {
    fn start(upstream: u16) -> Proxy {
        let port = free_test_port();
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("proxy bind");
        let accepted = Arc::new(AtomicU64::new(0));
        let generation = Arc::new(AtomicU64::new(0));
        let (count, gen) = (accepted.clone(), generation.clone());
        std::thread::spawn(move || {
            for down in listener.incoming() {
                let Ok(down) = down else { continue };
                let Ok(up) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                count.fetch_add(1, Ordering::SeqCst);
                let mine = gen.load(Ordering::SeqCst);
                for (from, to) in [
                    (down.try_clone().unwrap(), up.try_clone().unwrap()),
                    (up, down),
                ] {
                    let gen = gen.clone();
                    std::thread::spawn(move || pipe(from, to, mine, &gen));
                }
            }
        });
        Proxy {
            port,
            accepted,
            generation,
        }
    }

    fn freeze(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// Copies `from` to `to` while the proxy's generation is still `mine`;
/// then holds both open, forwarding nothing, until the test ends.
fn pipe(mut from: TcpStream, mut to: TcpStream, mine: u64, gen: &AtomicU64) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => {
                let _ = to.shutdown(std::net::Shutdown::Write);
                return;
            }
            Ok(n) => n,
        };
        if gen.load(Ordering::SeqCst) != mine {
            // Frozen: neither closed nor read any more.
            let _keep = (from, to);
            loop {
                std::thread::park();
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}

/// A subscriber whose connection freezes mid-feed connects again by itself
/// (the PINGs to the publisher go unanswered), stores what is published
/// after, and counts the messages it never got as a gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silently_dead_connection_is_given_up_and_made_again_with_the_loss_as_a_gap() {
    let env = Env::start().await;
    let pub_port = free_test_port();
    let proxy = Proxy::start(pub_port);
    let cfg = env.config(&format!(
        r#"
[publishers.synth]
feed = "synthetic"
endpoint = "tcp://127.0.0.1:{pub_port}"
rate = 500
count = 0
wait_for_subscribers = 1

[subscribers.main]
connect = ["tcp://127.0.0.1:{}"]
topics = [""]
"#,
        proxy.port
    ));
    let cfg = cfg.to_str().unwrap();
    // Killed when the test ends (its feed has no end).
    let publisher = env.spawn("nbpy-publisher", &["--config", cfg, "synth"], &[]);
    publisher.wait_log("bound", Duration::from_secs(20));
    let mut subscriber = env.spawn("nbpy-subscriber", &["--config", cfg, "main"], &[]);

    assert!(
        env.wait_for_points(500, Duration::from_secs(60)).await >= 500,
        "{}",
        subscriber.log_text()
    );
    proxy.freeze();
    let frozen_at = env.count_data().await;
    assert_eq!(proxy.accepted(), 1);

    // The silence limit (15 s), the backoff (at most 2 s), and a margin.
    let t0 = Instant::now();
    while proxy.accepted() < 2 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the subscriber never connected again\n{}",
            subscriber.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Data flows again through the new connection.
    let want = frozen_at + 2000;
    assert!(
        env.wait_for_points(want, Duration::from_secs(60)).await >= want,
        "{}",
        subscriber.log_text()
    );
    subscriber.signal(nix::sys::signal::Signal::SIGTERM);
    subscriber.wait_success(Duration::from_secs(30));

    let log = subscriber.log_text();
    let lost = log
        .lines()
        .find(|l| l.contains("WARN") && l.contains("presumed dead"))
        .unwrap_or_else(|| panic!("no WARN about the dead connection\n{log}"));
    assert!(
        lost.contains(&format!(
            "lost tcp://127.0.0.1:{}: nothing received for",
            proxy.port
        )),
        "{lost}"
    );
    // What was published while the connection was dead is a gap.
    let summary = stop_summary(&log, "main");
    assert!(number_before(&summary, "gaps") >= 1, "{summary}");
}

/// A subscriber that was itself paused (SIGSTOP; a suspended VM or
/// container) for longer than the silence limit keeps its connection: what
/// arrived meanwhile is waiting in its socket, and it asks (a PING) before
/// it gives anything up. It used to come back to its old "last heard",
/// find the limit long past and drop the connection unread: 362 of 1,000
/// messages lost (counted as a gap) in the tester's run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_paused_past_the_silence_limit_keeps_its_connection_and_data() {
    const N: u64 = 600;
    let env = Env::start().await;
    let ep = free_endpoint();
    let cfg = env.config(&format!(
        r#"
[publishers.synth]
feed = "synthetic"
endpoint = "{ep}"
rate = 20
count = {N}
wait_for_subscribers = 1

[subscribers.main]
connect = ["{ep}"]
topics = [""]
"#
    ));
    let cfg = cfg.to_str().unwrap();
    let mut publisher = env.spawn("nbpy-publisher", &["--config", cfg, "synth"], &[]);
    publisher.wait_log("bound", Duration::from_secs(20));
    let mut subscriber = env.spawn("nbpy-subscriber", &["--config", cfg, "main"], &[]);
    assert!(
        env.wait_for_points(40, Duration::from_secs(60)).await >= 40,
        "{}",
        subscriber.log_text()
    );
    // Past the 15 s silence limit, while the feed goes on (rate 20: about
    // 360 messages wait in the socket buffers).
    subscriber.signal(nix::sys::signal::Signal::SIGSTOP);
    tokio::time::sleep(Duration::from_secs(18)).await;
    subscriber.signal(nix::sys::signal::Signal::SIGCONT);
    publisher.wait_success(Duration::from_secs(120));
    assert_eq!(
        env.wait_for_points(N, Duration::from_secs(60)).await,
        N,
        "{}",
        subscriber.log_text()
    );
    subscriber.signal(nix::sys::signal::Signal::SIGTERM);
    subscriber.wait_success(Duration::from_secs(30));
    let log = subscriber.log_text();
    assert!(!log.contains("presumed dead"), "{log}");
    let summary = stop_summary(&log, "main");
    assert_eq!(number_before(&summary, "gaps"), 0, "{summary}");
}
