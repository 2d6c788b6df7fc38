//! Executor: not built yet (see the executor issue); the crate exists so the workspace has its final shape.
