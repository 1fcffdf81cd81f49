//! Generated protobuf and gRPC types for every Dropline context (`dropline.<context>.v1`),
//! plus the encoded file descriptor set that server reflection serves, and the codec they
//! all use.

pub mod codec;

/// Shared types: money.
pub mod common {
    pub mod v1 {
        tonic::include_proto!("dropline.common.v1");
    }
}

/// Buyer checkout: reserve, confirm, cancel, availability, orders.
pub mod checkout {
    pub mod v1 {
        tonic::include_proto!("dropline.checkout.v1");
    }
}

/// Operator drop management.
pub mod operator {
    pub mod v1 {
        tonic::include_proto!("dropline.operator.v1");
    }
}

/// Partner registry and hubs.
pub mod registry {
    pub mod v1 {
        tonic::include_proto!("dropline.registry.v1");
    }
}

/// Courier dispatch.
pub mod dispatch {
    pub mod v1 {
        tonic::include_proto!("dropline.dispatch.v1");
    }
}

/// Creator settlement.
pub mod settlement {
    pub mod v1 {
        tonic::include_proto!("dropline.settlement.v1");
    }
}

/// Pop-up edges: leases, top-ups, uploads of offline sales.
pub mod edge {
    pub mod v1 {
        tonic::include_proto!("dropline.edge.v1");
    }
}

/// The bare echo service used as the gRPC ceiling in load tests.
pub mod bench {
    pub mod v1 {
        tonic::include_proto!("dropline.bench.v1");
    }
}

/// Encoded `FileDescriptorSet` of all Dropline protos, for grpc.reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("dropline_descriptor");
