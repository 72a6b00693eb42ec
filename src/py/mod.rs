//! Python bindings (`fastmcp_guard._core`), compiled only with the `python` feature.

mod audit;
