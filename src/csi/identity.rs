//! The Identity service: who the plugin is, what it offers, and whether it is ready.

use std::collections::HashMap;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::proto::plugin_capability::{
    Service, Type as CapType, VolumeExpansion, service, volume_expansion,
};
use super::proto::{self, identity_server::Identity};
use super::{Shared, blocking};

pub struct IdentityService {
    shared: Arc<Shared>,
}

impl IdentityService {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

fn service_cap(t: service::Type) -> proto::PluginCapability {
    proto::PluginCapability {
        r#type: Some(CapType::Service(Service { r#type: t as i32 })),
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    #[tracing::instrument(name = "GetPluginInfo", skip_all)]
    async fn get_plugin_info(
        &self,
        _request: Request<proto::GetPluginInfoRequest>,
    ) -> Result<Response<proto::GetPluginInfoResponse>, Status> {
        Ok(Response::new(proto::GetPluginInfoResponse {
            name: self.shared.config.driver_name.clone(),
            vendor_version: env!("CARGO_PKG_VERSION").to_string(),
            manifest: HashMap::new(),
        }))
    }

    #[tracing::instrument(name = "GetPluginCapabilities", skip_all)]
    async fn get_plugin_capabilities(
        &self,
        _request: Request<proto::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<proto::GetPluginCapabilitiesResponse>, Status> {
        let mut capabilities = Vec::new();
        if self.shared.config.mode.controller() {
            capabilities.push(service_cap(service::Type::ControllerService));
        }
        capabilities.push(service_cap(service::Type::VolumeAccessibilityConstraints));
        capabilities.push(proto::PluginCapability {
            r#type: Some(CapType::VolumeExpansion(VolumeExpansion {
                r#type: volume_expansion::Type::Online as i32,
            })),
        });
        Ok(Response::new(proto::GetPluginCapabilitiesResponse {
            capabilities,
        }))
    }

    #[tracing::instrument(name = "Probe", skip_all)]
    async fn probe(
        &self,
        _request: Request<proto::ProbeRequest>,
    ) -> Result<Response<proto::ProbeResponse>, Status> {
        let deps = self.shared.deps.clone();
        let backend = self.shared.backend.clone();
        let missing = blocking(move || {
            let mut missing = Vec::new();
            // A stacked plugin is only as ready as the driver it stacks over.
            match backend.as_ref().map(|b| b.probe()) {
                None | Some(Ok(true)) => {}
                Some(Ok(false)) => missing.push("the backend CSI driver is not ready".to_string()),
                Some(Err(e)) => missing.push(e.to_string()),
            }
            // A stacked controller has neither: it does not use them.
            if let Some(deps) = &deps {
                if let Err(e) = deps.dm.version() {
                    missing.push(format!("device-mapper is not usable: {e}"));
                }
                if let Err(e) = deps.engine.probe_source() {
                    missing.push(e);
                }
            }
            Ok(missing)
        })
        .await?;
        if missing.is_empty() {
            return Ok(Response::new(proto::ProbeResponse { ready: Some(true) }));
        }
        Err(super::status::from_error(&NotReady(missing.join("; "))))
    }
}

/// What Probe answers when a dependency is missing (spec: FAILED_PRECONDITION, plugin not healthy).
#[derive(Debug, thiserror::Error)]
#[error("plugin not ready: {0}")]
pub struct NotReady(pub String);

impl crate::error::Classify for NotReady {
    fn kind(&self) -> crate::error::Kind {
        crate::error::Kind::FailedPrecondition
    }
}
