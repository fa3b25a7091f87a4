//! The generation worker: one thread runs `VideoStream::next_block` into a bounded queue
//! of decoded blocks that the streaming thread pops.
//!
//! Generation and pushing overlap, so a block is being denoised while the previous one
//! goes downstream. The queue is bounded so a paused or slow pipeline stops the generator
//! instead of piling up frames. Prompt and settings changes are handed over here and
//! applied between blocks, so the (cheap but not free) prompt encoding never runs on the
//! streaming thread.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use motioncache::generate::{BlockStats, GeneratorSettings};
use motioncache::pipeline::{DecodedBlock, VideoStream};

/// What the streaming thread gets from [`Worker::pop`].
pub enum Popped {
    Block(DecodedBlock),
    /// `unlock()` asked the streaming thread to return.
    Flushing,
    /// The generator stopped with an error (message for the user).
    Failed(String),
    /// The stream ended (a finite stream reached its frame count).
    Ended,
}

/// Called on the worker thread: once per finished block (before it is queued), and for
/// problems that do not stop generation (e.g. a prompt that could not be encoded).
pub struct Callbacks {
    /// The block's statistics and its number of pixel frames.
    pub on_block: OnBlock,
    pub on_warning: Box<dyn Fn(String) + Send>,
}

pub type OnBlock = Box<dyn Fn(&BlockStats, usize) + Send>;

#[derive(Default)]
struct Queue {
    blocks: VecDeque<DecodedBlock>,
    flushing: bool,
    failure: Option<String>,
    ended: bool,
    pending_prompt: Option<(String, String)>,
    pending_settings: Option<GeneratorSettings>,
}

struct Shared {
    queue: Mutex<Queue>,
    changed: Condvar,
    /// Checked by the generator before every transformer layer.
    cancel: AtomicBool,
    /// Tint recomputed tokens in the frames (property `overlay`).
    overlay: AtomicBool,
    capacity: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A panic on the worker thread must not take the streaming thread down with it.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub struct Worker {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Worker {
    /// Starts generating `stream` at once; at most `capacity` finished blocks wait in the
    /// queue.
    pub fn spawn(
        stream: VideoStream,
        capacity: usize,
        callbacks: Callbacks,
    ) -> std::io::Result<Worker> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            changed: Condvar::new(),
            cancel: AtomicBool::new(false),
            overlay: AtomicBool::new(false),
            capacity: capacity.max(1),
        });
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("motioncache-gen".into())
            .spawn(move || run(stream, &thread_shared, callbacks))?;
        Ok(Worker {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Waits for the next block; returns early when flushing, failed or ended.
    pub fn pop(&self) -> Popped {
        let mut q = self.shared.lock();
        loop {
            if q.flushing {
                return Popped::Flushing;
            }
            if let Some(b) = q.blocks.pop_front() {
                self.shared.changed.notify_all();
                return Popped::Block(b);
            }
            if let Some(e) = &q.failure {
                return Popped::Failed(e.clone());
            }
            if q.ended {
                return Popped::Ended;
            }
            q = self
                .shared
                .changed
                .wait(q)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// `unlock()` / `unlock_stop()`: makes a waiting `pop` return without stopping the
    /// generator (a live source unlocks on PLAYING -> PAUSED too).
    pub fn set_flushing(&self, flushing: bool) {
        self.shared.lock().flushing = flushing;
        self.shared.changed.notify_all();
    }

    /// New prompt and negative prompt, encoded on the worker and applied from the next
    /// block it starts.
    pub fn set_prompts(&self, prompt: String, negative: String) {
        self.shared.lock().pending_prompt = Some((prompt, negative));
    }

    /// Whether the frames of the next blocks show the cache's recomputation.
    pub fn set_overlay(&self, on: bool) {
        self.shared.overlay.store(on, Ordering::Relaxed);
    }

    /// New (validated) settings, applied from the next block the worker starts.
    pub fn set_settings(&self, settings: GeneratorSettings) {
        self.shared.lock().pending_settings = Some(settings);
    }

    /// Stops the generator within one transformer layer and joins the thread.
    pub fn shutdown(&self) {
        self.shared.cancel.store(true, Ordering::SeqCst);
        {
            let mut q = self.shared.lock();
            q.flushing = true;
            q.blocks.clear();
        }
        self.shared.changed.notify_all();
        let handle = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn run(mut stream: VideoStream, shared: &Shared, cb: Callbacks) {
    // A panic (a bug, or a callback's) becomes the stream's error instead of a thread that
    // silently ends while the streaming thread waits for it.
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        generate(&mut stream, shared, &cb)
    }));
    // Drop the stream (and with it the K/V caches) before telling anyone we are done.
    drop(stream);
    let mut q = shared.lock();
    match outcome {
        Ok(Ok(()) | Err(motioncache::Error::Cancelled)) => {}
        Ok(Err(e)) => q.failure = Some(e.to_string()),
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".into());
            q.failure = Some(format!("the generator thread panicked: {what}"));
        }
    }
    q.ended = true;
    drop(q);
    shared.changed.notify_all();
}

fn generate(stream: &mut VideoStream, shared: &Shared, cb: &Callbacks) -> motioncache::Result<()> {
    loop {
        let (prompts, settings) = {
            let mut q = shared.lock();
            (q.pending_prompt.take(), q.pending_settings.take())
        };
        if let Some((prompt, negative)) = prompts
            && let Err(e) = stream.set_prompt(&prompt, &negative)
        {
            (cb.on_warning)(format!(
                "cannot use the new prompt {prompt:?} (negative {negative:?}): {e}; \
                 keeping the previous one"
            ));
        }
        if let Some(s) = settings
            && let Err(e) = stream.set_settings(s)
        {
            (cb.on_warning)(format!(
                "cannot apply the new settings: {e}; keeping the previous ones"
            ));
        }
        if shared.cancel.load(Ordering::SeqCst) {
            return Err(motioncache::Error::Cancelled);
        }
        let Some(mut block) = stream.next_block(&shared.cancel)? else {
            return Ok(());
        };
        if shared.overlay.load(Ordering::Relaxed) {
            let (w, h) = (block.width, block.height);
            motioncache::overlay::tint_recomputed(&mut block.frames, w, h, &block.stats);
        }
        (cb.on_block)(&block.stats, block.frames.len());
        let mut q = shared.lock();
        while q.blocks.len() >= shared.capacity && !shared.cancel.load(Ordering::SeqCst) {
            q = shared.changed.wait(q).unwrap_or_else(|e| e.into_inner());
        }
        if shared.cancel.load(Ordering::SeqCst) {
            return Err(motioncache::Error::Cancelled);
        }
        q.blocks.push_back(block);
        drop(q);
        shared.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use candle_core::{DType, Device};

    /// A fault injected on the worker thread (a panicking block callback) ends the stream
    /// with an error that says so, instead of leaving `pop` waiting forever.
    #[test]
    fn a_panic_on_the_worker_becomes_the_stream_error() {
        let p = Arc::new(
            motioncache::pipeline::Pipeline::load_embedded(&Device::Cpu, DType::F32).unwrap(),
        );
        let mut s = p.info().defaults.clone();
        s.total_frames = Some(s.window);
        let stream = p.stream("a red circle moving right", "", s, 1).unwrap();
        let cb = Callbacks {
            on_block: Box::new(|_, _| panic!("injected fault")),
            on_warning: Box::new(|_| {}),
        };
        let w = Worker::spawn(stream, 2, cb).unwrap();
        match w.pop() {
            Popped::Failed(m) => {
                assert!(
                    m.contains("panicked") && m.contains("injected fault"),
                    "{m}"
                )
            }
            _ => panic!("expected the injected panic as a failure"),
        }
    }
}
