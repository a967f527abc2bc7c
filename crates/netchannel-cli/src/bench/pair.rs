//! The skeleton of the modes that run one server end and one client end over a [`Net`] —
//! `bench stream`, `short`, `pingpong` and `connect`: each end on a thread of its own (the ends
//! this process's `--role` has), the main thread [`watch`]ing them until both have a result.
//! A mode describes its two ends with a [`Pair`] and hands [`Pair::run`] what each thread does.

use std::ops::ControlFlow;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use netchannel::Config;

use super::backend::{Connector, Listener, Net};
use super::{emit, spawn, watch, CommonOpts, Progress, Report, Role, Stack, Watch};
use crate::error::{Error, Result};
use crate::pattern;

/// One end of a [`Pair`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The accepting end.
    Server,
    /// The connecting end.
    Client,
}

/// How a mode names and runs its two ends.
pub struct Pair {
    /// The mode, also the prefix of the threads' names ("stream" → "stream-receiver").
    mode: &'static str,
    /// What the accepting end is called: "receiver" or "server".
    server: &'static str,
    /// What the connecting end is called: "sender" or "client".
    client: &'static str,
    /// The end that checks the data with `--verify`. When both ends fail, its error is the one
    /// reported: it explains the other's (a verify failure closes the connection).
    verifier: End,
    /// What a server-only process says it waits for, after "listening on ADDR; ".
    waiting: &'static str,
    /// Whether a progress line is printed (unless `--json`).
    progress_line: bool,
    /// What a client-only process counts, as the stall message says: "sent" or "received".
    client_counts: &'static str,
}

impl Pair {
    /// A one-way mode (`stream`, `short`): the receiver verifies; the sender of a client-only
    /// run counts what it sent; a progress line.
    pub const fn one_way(mode: &'static str, waiting: &'static str) -> Pair {
        Pair {
            mode,
            server: "receiver",
            client: "sender",
            verifier: End::Server,
            waiting,
            progress_line: true,
            client_counts: "sent",
        }
    }

    /// A request/response mode (`pingpong`, `connect`): the client verifies the echoes; no
    /// progress line.
    pub const fn request_response(mode: &'static str, waiting: &'static str) -> Pair {
        Pair {
            mode,
            server: "server",
            client: "client",
            verifier: End::Client,
            waiting,
            progress_line: false,
            client_counts: "received",
        }
    }

    /// Run the mode once per stack of `--backend` (several only with `--role both`) with
    /// `run_one`, and print the reports.
    pub fn run_stacks<R: Report>(
        &self,
        common: &CommonOpts,
        verify: bool,
        mut run_one: impl FnMut(Stack, &Config) -> Result<R>,
    ) -> Result<()> {
        let config = common.engine_config()?;
        let stacks = common.backend.stacks();
        if stacks.len() > 1 && common.role != Role::Both {
            return Err("--backend both needs --role both (run server and client once per backend)".into());
        }
        self.note_verify(common.role, verify);
        pattern::byte_at(0); // build the table before anything is timed
        let mut reports = Vec::new();
        for stack in stacks {
            reports.push(run_one(stack, &config)?);
        }
        emit(self.mode, common.json, &reports)
    }

    /// Say so when `--verify` is given to the end that does not check.
    pub fn note_verify(&self, role: Role, verify: bool) {
        let (checker, give_to, unchecked) = match self.verifier {
            End::Server => (self.server, "server", Role::Client),
            End::Client => (self.client, "client", Role::Server),
        };
        if verify && role == unchecked {
            eprintln!("netchannel: note: --verify is checked by the {checker}; give it to the {give_to}");
        }
    }

    /// Run the ends of `common.role` on threads of their own and wait for their results. The
    /// server thread gets the listener and sends its result with `done` (a receiver sends it
    /// before it closes the connection, so that a verify failure arrives before the sender
    /// sees the close). The client thread gets the connector and the progress to count in a
    /// client-only run (in the others the server counts). Each result is there exactly when
    /// the role has its end.
    pub fn run<S: Send + 'static, C: Send + 'static>(
        &self,
        net: &mut Net,
        common: &CommonOpts,
        server: impl FnOnce(Listener, &Progress, &dyn Fn(Result<S>)) + Send + 'static,
        client: impl FnOnce(&Connector, Option<&Progress>) -> Result<C> + Send + 'static,
    ) -> Result<(Option<S>, Option<C>)> {
        enum Event<S, C> {
            Server(Result<S>),
            Client(Result<C>),
        }
        let role = common.role;
        let progress = Arc::new(Progress::default());
        let (tx, rx) = mpsc::channel();
        let mut expected = 0;
        if role.has_server() {
            let listener = net.listen()?;
            if role == Role::Server {
                eprintln!("netchannel: listening on {}; {}", listener.describe(), self.waiting);
            }
            let (progress, tx) = (progress.clone(), tx.clone());
            spawn(&format!("{}-{}", self.mode, self.server), move || {
                server(listener, &progress, &|result| {
                    let _ = tx.send(Event::Server(result));
                })
            })?;
            expected += 1;
        }
        if role.has_client() {
            let connector = net.connector()?;
            let counted = (role == Role::Client).then(|| progress.clone());
            let tx = tx.clone();
            spawn(&format!("{}-{}", self.mode, self.client), move || {
                let result = client(&connector, counted.as_deref());
                let _ = tx.send(Event::Client(result));
            })?;
            expected += 1;
        }
        drop(tx);
        if role != Role::Server {
            progress.activate();
        }

        let (mut server_result, mut client_result) = (None, None);
        let opts = Watch {
            quiet: common.json || !self.progress_line,
            stall_timeout: Duration::from_secs_f64(common.stall_timeout),
            label: if role == Role::Client { self.client_counts } else { "received" },
        };
        watch(&rx, &progress, &opts, |event| {
            let failed = match event {
                Event::Server(r) => server_result.insert(r).is_err(),
                Event::Client(r) => client_result.insert(r).is_err(),
            };
            let done = server_result.iter().count() + client_result.iter().count() == expected;
            if failed || done {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })?;
        let (server_result, client_result) = match self.verifier {
            End::Server => {
                let server_result = server_result.transpose()?;
                (server_result, client_result.transpose()?)
            }
            End::Client => {
                let client_result = client_result.transpose()?;
                (server_result.transpose()?, client_result)
            }
        };
        let lost = |side: &str| {
            Error::from(format!("the {side} thread stopped without a result (see the panic above)"))
        };
        if role.has_server() && server_result.is_none() {
            return Err(lost(self.server));
        }
        if role.has_client() && client_result.is_none() {
            return Err(lost(self.client));
        }
        Ok((server_result, client_result))
    }
}
