//! A dst-mount worker: the process a keeper ([`crate::keeper`]) starts to serve its mount.
//! It connects the engine and says so, adopts the FUSE connection the keeper hands it,
//! has the kernel resend what a previous worker left unanswered, and serves until the
//! mount goes away or the keeper says stop (then it finishes in-flight work as a plain
//! mount does) or drain (an upgrade: what is in progress is answered and acked, nothing
//! new is started, and the next worker gets the rest).

use std::os::fd::AsFd;

use crate::client::engine::{Engine, EngineConfig};
use crate::fuse::{self, DstFs, FsConfig, WorkerInfo};
use crate::keeper::{
    self, Adopt, Control, ToKeeper, ToWorker, EXIT_DRAINED, EXIT_FAILED, EXIT_MOUNT_GONE,
    EXIT_SESSION_ERROR,
};
use crate::mount::{finish, follow_size, Output};
use crate::mount_options::MountRequest;
use crate::protocol::Access;

/// Serves the keeper's mount and exits with a code the keeper reads
/// ([`keeper::EXIT_MOUNT_GONE`] and the others).
pub fn run(req: &MountRequest, cfg: EngineConfig, control: Control) -> ! {
    let code = match serve(req, cfg, &control) {
        Ok(code) => code,
        // The keeper prints or logs it.
        Err(e) => {
            if let Err(gone) = control.tell_keeper(&ToKeeper::Failed(e.clone())) {
                log::error!("{e} (and the keeper is gone: {gone})");
            }
            EXIT_FAILED
        }
    };
    std::process::exit(code)
}

/// What ends serving.
enum End {
    /// The FUSE session ended: unmounted (Ok) or broken.
    Session(std::io::Result<()>),
    Told(ToWorker),
}

fn serve(req: &MountRequest, cfg: EngineConfig, control: &Control) -> Result<i32, String> {
    let output = Output::open(req.options.log_file.as_deref())?;
    if req.options.foreground == Some(true) {
        output.redirect_stderr();
    } else {
        output.detach_all();
    }
    let source = req.source.to_string();
    let engine =
        smol::block_on(Engine::start(cfg)).map_err(|e| format!("cannot mount {source}: {e}"))?;
    let info = engine.info().clone();
    if let Err(e) = fuse::check_file_name(&info.export) {
        smol::block_on(engine.close());
        return Err(format!("cannot mount {source}: {e}"));
    }
    let read_only = info.access == Access::ReadOnly;
    let told = control.tell_keeper(&ToKeeper::Connected {
        read_only,
        size: info.size,
        export: info.export.clone(),
    });
    let adopt = match (told, control.from_keeper()) {
        (Ok(()), Ok(Some((ToWorker::Adopt(adopt), Some(fd))))) => (adopt, fd),
        (_, Ok(Some((ToWorker::Stop, _)))) => {
            smol::block_on(engine.close());
            return Ok(EXIT_MOUNT_GONE);
        }
        (Err(e), _) | (_, Err(e)) => return Err(format!("the keeper is gone: {e}")),
        (_, other) => return Err(format!("unexpected word from the keeper: {other:?}")),
    };
    let (
        Adopt {
            kernel,
            keeper_pid,
            restarts,
            last_exit,
            mountpoint,
        },
        fuse_fd,
    ) = adopt;
    // SAFETY: plain system calls without arguments.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let fs = DstFs::new(
        engine.clone(),
        FsConfig {
            name: info.export.clone(),
            block_size: info.block_size,
            read_only,
            uid,
            gid,
            worker: WorkerInfo {
                keeper_pid,
                worker_pid: std::process::id(),
                restarts,
                last_exit,
            },
        },
    );
    let tasks = fs.tasks();
    let session = keeper::adopt(
        fs,
        fuse_fd,
        &kernel,
        fuse::mount_config(&source, read_only, uid == 0),
    )
    .map_err(|e| format!("cannot serve the FUSE connection: {e}"))?;
    if kernel.can_resend() {
        if let Err(e) = keeper::request_resend(session.as_fd()) {
            log::warn!("cannot have the kernel resend unanswered requests: {e}");
        }
    }
    // Not fatal: the mount works, only growth would go unseen until the next mount.
    if let Err(e) = follow_size(&engine, session.notifier(), mountpoint.join(&info.export)) {
        log::warn!("{e}");
    }
    let (end_tx, end_rx) = smol::channel::bounded(2);
    let session_end = end_tx.clone();
    std::thread::Builder::new()
        .name("fuse".into())
        .spawn(move || {
            let _ = session_end.send_blocking(End::Session(session.run()));
        })
        .map_err(|e| format!("cannot start the FUSE thread: {e}"))?;
    let words = control
        .try_clone()
        .map_err(|e| format!("cannot read the control socket: {e}"))?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || loop {
            match words.from_keeper() {
                Ok(Some((word, _))) => {
                    let _ = end_tx.send_blocking(End::Told(word));
                }
                // The keeper is gone; the parent-death signal ends this process.
                _ => return,
            }
        })
        .map_err(|e| format!("cannot start the control thread: {e}"))?;
    control
        .tell_keeper(&ToKeeper::Serving)
        .map_err(|e| format!("the keeper is gone: {e}"))?;
    // The keeper says when the first one serves, in the log's first line.
    if restarts > 0 {
        log::info!(
            "worker {} serves {source} at {}",
            std::process::id(),
            mountpoint.display()
        );
    }

    Ok(smol::block_on(async {
        loop {
            match end_rx.recv().await {
                Ok(End::Session(Ok(()))) | Ok(End::Told(ToWorker::Stop)) | Err(_) => {
                    finish(&tasks, &engine).await;
                    return EXIT_MOUNT_GONE;
                }
                Ok(End::Session(Err(e))) => {
                    log::error!("FUSE session ended: {e}");
                    finish(&tasks, &engine).await;
                    return EXIT_SESSION_ERROR;
                }
                Ok(End::Told(ToWorker::Drain)) => {
                    let running = tasks.running();
                    log::info!("draining for an upgrade: {running} requests in progress");
                    tasks.drain().await;
                    engine.close().await;
                    log::info!("drained; the next worker takes over");
                    return EXIT_DRAINED;
                }
                Ok(End::Told(other)) => log::warn!("unexpected word from the keeper: {other:?}"),
            }
        }
    }))
}
