//! Scheduling for isolation and small messages, end to end on loopback: latency and bulk
//! vsockets sharing channels keep their data exact, batches respect their caps, and the
//! per-class queue depths drain. Behaviour only, never speed.

mod common;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::time::{Duration, Instant};

use common::{at, check, fill, two_hosts, within};
use netchannel::{Class, Depth, Host};

/// Write `total` bytes of stream `seed` in `chunk`-byte writes, then half-close.
fn send(s: netchannel::VStream, seed: u64, total: u64, chunk: usize) {
    let mut buf = vec![0u8; chunk];
    let mut off = 0;
    while off < total {
        let n = chunk.min((total - off) as usize);
        fill(seed, off, &mut buf[..n]);
        (&s).write_all(&buf[..n]).expect("bulk write");
        off += n as u64;
    }
    s.shutdown(Shutdown::Write).unwrap();
}

/// Read stream `seed` to EOF, checking every byte; returns the byte count.
fn receive(s: netchannel::VStream, seed: u64) -> u64 {
    let mut buf = vec![0u8; 100_000];
    let mut off = 0;
    loop {
        let n = (&s).read(&mut buf).expect("bulk read");
        if n == 0 {
            return off;
        }
        assert_eq!(check(seed, off, &buf[..n]), None, "stream {seed} differs from its pattern");
        off += n as u64;
    }
}

/// Ping-pong `rounds` messages of `size` on a latency vsocket pair, checking both ways.
fn ping_pong(c: &netchannel::VStream, s: &netchannel::VStream, rounds: u64, size: usize) {
    for i in 0..rounds {
        let mut msg = vec![0u8; size];
        fill(1000 + i, 0, &mut msg);
        (&*c).write_all(&msg).unwrap();
        let mut got = vec![0u8; size];
        (&*s).read_exact(&mut got).unwrap();
        assert_eq!(check(1000 + i, 0, &got), None, "request {i} arrived damaged");
        (&*s).write_all(&got).unwrap();
        let mut back = vec![0u8; size];
        (&*c).read_exact(&mut back).unwrap();
        assert_eq!(back, msg, "echo {i} came back damaged");
    }
}

/// Wait (bounded) until every channel of `h` has nothing queued in its lanes or gathered.
fn queues_drain(h: &Host) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st = h.stats();
        let [bulk, lat] = st.class_queues();
        let empty = |q: &netchannel::ClassQueue| q.queue.total() == Depth::default() && q.queued == 0;
        if empty(&bulk) && empty(&lat) {
            assert_eq!(bulk.class, Class::Throughput);
            assert_eq!(lat.class, Class::Latency);
            return;
        }
        assert!(Instant::now() < deadline, "queues did not drain: {:?}", st.class_queues());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Bulk and latency vsockets on the same hosts, two bulk streams and a ping-pong at once,
/// every byte checked; `tweak` sets the scheduling knobs.
fn coexist(tweak: impl Fn(&mut netchannel::Config), bulk_each: u64) -> (Host, Host) {
    let (a, b) = two_hosts(tweak);
    let bulk_l = b.bind(9900).unwrap();
    let lat_l = b.bind(9901).unwrap();
    let lat = a.connect_class(at(&b, 9901), Class::Latency).unwrap();
    let (lat_s, _) = lat_l.accept().unwrap();
    let mut threads = Vec::new();
    for seed in [31u64, 32] {
        let tx = a.connect(at(&b, 9900)).unwrap();
        let (rx, _) = bulk_l.accept().unwrap();
        threads.push(std::thread::spawn(move || {
            send(tx, seed, bulk_each, 300_000);
            0
        }));
        threads.push(std::thread::spawn(move || receive(rx, seed)));
    }
    ping_pong(&lat, &lat_s, 200, 4096);
    let got: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(got, 2 * bulk_each, "every bulk byte arrived");
    ping_pong(&lat, &lat_s, 20, 100);
    drop((lat, lat_s));
    (a, b)
}

#[test]
fn latency_vsockets_borrowing_bulk_channels_keep_data_exact() {
    within(120, || {
        // No latency channels: latency segments share the bulk channels' queues (their own
        // lane), under small batches and a small kernel send buffer.
        let (a, b) = coexist(
            |c| {
                c.latency_channels = 0;
                c.throughput_channels = 2;
                c.bulk_sndbuf = 64 << 10;
                c.write_batch = 16 << 10;
                c.write_batch_frames = 4;
                c.segment_size = 16 << 10;
            },
            8 << 20,
        );
        for h in [&a, &b] {
            queues_drain(h);
            let st = h.stats();
            assert!(st.channels.iter().all(|c| c.class == Class::Throughput));
            for c in &st.channels {
                // A write carries at most 4 frames (a partial write makes it more writes).
                assert!(c.writes * 4 >= c.frames_sent, "batch cap exceeded: {c:?}");
            }
        }
    });
}

#[test]
fn latency_and_bulk_on_their_own_channels_keep_data_exact_with_bounded_bulk() {
    within(120, || {
        let (a, b) = coexist(
            |c| {
                c.latency_channels = 1;
                c.bulk_sndbuf = 32 << 10;
                // A queue of one segment (channel_queue is at least segment_size).
                c.segment_size = 64 << 10;
                c.channel_queue = 64 << 10;
                c.write_batch = 64 << 10;
                c.latency_spin_us = 50;
            },
            8 << 20,
        );
        for h in [&a, &b] {
            queues_drain(h);
        }
        let st = a.stats();
        let lat: Vec<_> = st.channels.iter().filter(|c| c.class == Class::Latency).collect();
        assert_eq!(lat.len(), 1);
        assert!(lat[0].bytes_sent >= 200 * 4096 + 20 * 100 && lat[0].bytes_sent < 4 << 20, "{:?}", lat[0]);
    });
}

#[test]
fn one_frame_per_write_when_the_batch_cap_is_one() {
    within(60, || {
        let (a, b) = two_hosts(|c| {
            c.throughput_channels = 1;
            c.write_batch_frames = 1;
        });
        let l = b.bind(9902).unwrap();
        let tx = a.connect(at(&b, 9902)).unwrap();
        let (rx, _) = l.accept().unwrap();
        let sender = std::thread::spawn(move || send(tx, 40, 2 << 20, 700));
        assert_eq!(receive(rx, 40), 2 << 20);
        sender.join().unwrap();
        queues_drain(&a);
        for c in a.stats().channels {
            // Frames are counted when gathered, writes when done: one gathered frame may
            // still wait for its write (the batch cap is one frame).
            assert!(c.writes + 1 >= c.frames_sent, "a write carried several frames: {c:?}");
        }
    });
}
