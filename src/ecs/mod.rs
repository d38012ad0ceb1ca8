//! The ECS RPC API client: signing, transport, typed errors, retry policy and the actions the
//! executor needs.
//!
//! Why its own module tree: everything that knows how Aliyun's RPC API is spelled lives here —
//! [`sign`] (signature v1, pure), [`transport`] (HTTP behind a trait), [`error`] (Aliyun's error
//! shape and its classification), [`retry`] (the written-down retry policy), [`types`] (typed
//! requests and answers) and [`client`] ([`EcsClient`], which ties them together). The rest of
//! the program speaks in [`Instance`]s, [`SpotPricePoint`]s and [`ErrorKind`]s.

pub mod client;
pub mod credentials;
pub mod endpoint;
pub mod error;
pub mod names;
pub mod paging;
pub mod retry;
pub mod sign;
pub mod transport;
pub mod types;

pub use client::{
    run_instances_params, signed_params, ClientConfig, EcsClient, RequestStamp, SystemStamp, API_VERSION,
};
pub use endpoint::{check_endpoint, check_region_id, check_url, resolve_endpoint, validate_region_id};
pub use error::{
    classify, create_action, published_error, published_errors, CreateAction, EcsError, ErrorKind,
    PublishedError,
};
pub use retry::{Backoff, Clock, FakeClock, RetryPolicy, SystemClock};
pub use transport::{HttpRequest, HttpResponse, Transport, TransportError, UreqTransport};
pub use types::{
    format_price, AvailableResourceRequest, DeleteOutcome, DescribeInstancesFilter, ImageInfo, Instance,
    InstanceStatus, InstanceTypeFilter, InstanceTypeInfo, KeyPairInfo, RegionInfo, RunInstancesRequest,
    SecurityGroupInfo, SpotPriceHistory, SpotPriceHistoryRequest, SpotPricePoint, SpotStrategy, ZoneInfo,
    ZoneResource,
};
