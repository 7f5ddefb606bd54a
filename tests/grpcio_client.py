#!/usr/bin/env python3
"""A CSI client built on gRPC C-core (PyPI grpcio), with DEFAULT channel options.

Usage: grpcio_client.py <socket path> <proto dir> <scratch dir>

C-core sends the percent-encoded socket path as `:authority` for a `unix:` target (as do the C++, Ruby
and PHP clients and Apache Mesos). That is the point of this client: no `grpc.default_authority`, no
other option. Stubs are generated from the repository's csi.proto into the scratch dir at run time.
Prints one JSON object with what the plugin answered; tests/grpc_clients.rs asserts on it.
"""

import json
import os
import sys


def main():
    socket_path, proto_dir, scratch = sys.argv[1:4]

    import grpc
    import grpc_tools
    from grpc_tools import protoc

    # The well-known types (descriptor, timestamp, wrappers) ship inside grpc_tools.
    wkt = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    rc = protoc.main([
        "grpc_tools.protoc",
        f"-I{proto_dir}",
        f"-I{wkt}",
        f"--python_out={scratch}",
        f"--grpc_python_out={scratch}",
        os.path.join(proto_dir, "csi.proto"),
    ])
    if rc != 0:
        raise SystemExit(f"grpc_tools.protoc failed with {rc}")
    sys.path.insert(0, scratch)
    import csi_pb2
    import csi_pb2_grpc

    out = {}
    # Default options on purpose: see the module docstring.
    with grpc.insecure_channel(f"unix:{socket_path}") as channel:
        identity = csi_pb2_grpc.IdentityStub(channel)
        info = identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=20)
        out["name"] = info.name
        out["vendor_version"] = info.vendor_version
        probe = identity.Probe(csi_pb2.ProbeRequest(), timeout=20)
        out["ready"] = probe.ready.value if probe.HasField("ready") else None
        caps = identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest(), timeout=20)
        out["plugin_capabilities"] = sorted(
            csi_pb2.PluginCapability.Service.Type.Name(c.service.type)
            for c in caps.capabilities
            if c.HasField("service")
        )
        controller = csi_pb2_grpc.ControllerStub(channel)
        ccaps = controller.ControllerGetCapabilities(
            csi_pb2.ControllerGetCapabilitiesRequest(), timeout=20
        )
        out["controller_capabilities"] = sorted(
            csi_pb2.ControllerServiceCapability.RPC.Type.Name(c.rpc.type)
            for c in ccaps.capabilities
            if c.HasField("rpc")
        )
        # An error reply must arrive as a gRPC status, not as a reset stream.
        try:
            controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=""), timeout=20)
            out["delete_empty_id"] = "OK"
        except grpc.RpcError as e:
            out["delete_empty_id"] = e.code().name
    print(json.dumps(out))


if __name__ == "__main__":
    main()
