//! Compactor: not built yet (see the compactor issue); the crate exists so the workspace has its final shape.
