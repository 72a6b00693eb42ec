//! Binding of the IP matcher (`src/ipmatch.rs`) behind the `IPPolicy` facade
//! (`ip/__init__.py`): the `IPMatcher` class (also used by `config.py` and `metrics.py`).

use pyo3::prelude::*;

use crate::ipmatch::{IpDecision, IpMatcher};

/// Allow / deny lists (deny wins) and trusted proxies.
#[pyclass(frozen, module = "fastmcp_guard._core", name = "IPMatcher")]
pub(super) struct PyIpMatcher(IpMatcher);

#[pymethods]
impl PyIpMatcher {
    #[new]
    #[pyo3(signature = (*, allow=None, deny=None, trusted_proxies=None))]
    fn new(
        allow: Option<Vec<String>>,
        deny: Option<Vec<String>>,
        trusted_proxies: Option<Vec<String>>,
    ) -> PyResult<Self> {
        let (a, d, t) = (
            allow.unwrap_or_default(),
            deny.unwrap_or_default(),
            trusted_proxies.unwrap_or_default(),
        );
        Ok(PyIpMatcher(IpMatcher::new(&a, &d, &t)?))
    }

    fn is_allowed(&self, ip: &str) -> bool {
        self.0.is_allowed_str(ip)
    }

    fn check(&self, ip: &str) -> Option<&'static str> {
        match self.0.check_str(ip) {
            IpDecision::Allowed => None,
            IpDecision::Denied(reason) => Some(reason.as_str()),
        }
    }

    /// The client: an address, or the unparsable peer / forwarded hop itself (cut to 64
    /// characters), which `check` refuses as `"unparsable"`.
    #[pyo3(signature = (peer, x_forwarded_for=None))]
    fn client_ip(&self, peer: &str, x_forwarded_for: Option<&str>) -> String {
        self.0.resolve_client(peer, x_forwarded_for).text()
    }
}
