//! Parquet encoding of flushes on a thread of its own, at a lower CPU
//! priority (nice 10). Decoding batches and encoding a segment is bulk work
//! of tens of milliseconds per flush; on a small machine it must not take
//! the cores from the threads that answer producers (the reactor and the
//! WAL committer), which is what sets the produce tail.

use std::sync::mpsc;

use bytes::Bytes;
use shoal_storage::{EncodedSegment, SegmentOptions, ShardRows};
use tokio::sync::oneshot;

use crate::batch;
use crate::error::{Error, Result};

/// The batches of one shard to encode: stream, shard, batches in order.
pub(crate) type ShardInput = (String, i32, Vec<Bytes>);

struct Job {
    inputs: Vec<ShardInput>,
    done: oneshot::Sender<Result<EncodedSegment>>,
}

pub(crate) struct Encoder {
    jobs: mpsc::Sender<Job>,
}

impl Encoder {
    pub(crate) fn start() -> Result<Encoder> {
        let (jobs, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("shoal-encode".into())
            .spawn(move || {
                // Lowering one's own priority needs no privilege; if it
                // fails the work still gets done.
                if let Err(e) =
                    rustix::process::setpriority_process(Some(rustix::thread::gettid()), 10)
                {
                    tracing::debug!("cannot lower the encoder's priority: {e}");
                }
                while let Ok(job) = rx.recv() {
                    let _ = job.done.send(encode(job.inputs));
                }
            })
            .map_err(|e| Error::Internal(format!("starting the segment encoder: {e}")))?;
        Ok(Encoder { jobs })
    }

    pub(crate) async fn encode(&self, inputs: Vec<ShardInput>) -> Result<EncodedSegment> {
        let (done, rx) = oneshot::channel();
        self.jobs
            .send(Job { inputs, done })
            .map_err(|_| Error::Internal("the segment encoder stopped".into()))?;
        rx.await
            .map_err(|_| Error::Internal("the segment encoder stopped".into()))?
    }
}

fn encode(inputs: Vec<ShardInput>) -> Result<EncodedSegment> {
    let mut shard_rows = Vec::with_capacity(inputs.len());
    for (stream, shard, batches) in inputs {
        let mut records = Vec::new();
        for b in &batches {
            records.extend(batch::to_rows(b)?);
        }
        shard_rows.push(ShardRows {
            stream,
            shard,
            records,
        });
    }
    Ok(shoal_storage::encode_segment(
        shard_rows,
        &SegmentOptions::default(),
    )?)
}
