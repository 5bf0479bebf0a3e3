//! The writer the planned ops go through: `MapWriter` (the kernel layer's
//! BPF maps, or a test's fake) and `apply`, which keeps the applied record
//! in step with what was written.

use super::applied::Applied;
use super::ops::MapOp;

/// Executes map operations; the kernel layer writes BPF maps, tests use a
/// fake that checks the ordering invariants.
pub trait MapWriter {
    type Error: std::error::Error + Send + Sync + 'static;
    fn apply(&mut self, op: &MapOp) -> Result<(), Self::Error>;

    /// Applies a run of ops of one [`MapOp::run_kind`] (one map, one
    /// phase), in order, as if by `apply` one after the other: the kernel
    /// layer writes a run with one batch call where it can. On failure,
    /// returns how many ops of the run were completely written first.
    fn apply_run(&mut self, ops: &[MapOp]) -> Result<(), (usize, Self::Error)> {
        for (index, op) in ops.iter().enumerate() {
            self.apply(op).map_err(|error| (index, error))?;
        }
        Ok(())
    }
}

/// An op the kernel refused; everything before it is written and recorded.
#[derive(Debug, thiserror::Error)]
#[error("applying \"{op}\" failed (op {index} of {total})")]
pub struct ApplyError<E: std::error::Error + 'static> {
    pub op: MapOp,
    pub index: usize,
    pub total: usize,
    #[source]
    pub source: E,
}

/// Applies `ops` in order, recording each success in `applied`; stops at
/// the first failure. Consecutive ops of one kind go to the writer as one
/// run (`MapWriter::apply_run`): they are of one phase and one map, so
/// writing them together keeps the safe order.
pub fn apply<W: MapWriter>(
    writer: &mut W,
    applied: &mut Applied,
    ops: &[MapOp],
) -> Result<(), ApplyError<W::Error>> {
    let mut start = 0;
    while start < ops.len() {
        let kind = ops[start].run_kind();
        let len = match kind {
            Some(kind) => ops[start..]
                .iter()
                .take_while(|op| op.run_kind() == Some(kind))
                .count(),
            None => 1,
        };
        let run = &ops[start..start + len];
        let outcome = if len == 1 {
            writer.apply(&run[0]).map_err(|error| (0, error))
        } else {
            writer.apply_run(run)
        };
        let written = match &outcome {
            Ok(()) => len,
            Err((written, _)) => (*written).min(len),
        };
        for op in &ops[start..start + written] {
            applied.record(op);
        }
        if let Err((_, source)) = outcome {
            let index = start + written;
            return Err(ApplyError {
                op: ops[index.min(ops.len() - 1)].clone(),
                index: index + 1,
                total: ops.len(),
                source,
            });
        }
        start += len;
    }
    Ok(())
}
