//! The one place admin errors become gRPC statuses.

use tonic::{Code, Status};

use crate::raft::ProposeError;
use crate::registry::Rejection;

/// The gRPC code for a registry refusal; the message is the refusal's own text.
pub fn rejection_code(rejection: &Rejection) -> Code {
    match rejection {
        Rejection::UserNotFound(_)
        | Rejection::PreAuthKeyNotFound
        | Rejection::ApiKeyNotFound(_)
        | Rejection::NodeNotFound(_)
        | Rejection::PolicyVersionNotFound(_)
        | Rejection::NodeKeyNotFound(_)
        | Rejection::RegistrationNotFound(_) => Code::NotFound,
        Rejection::UserExists(_) | Rejection::ApiKeyExists(_) => Code::AlreadyExists,
        Rejection::InvalidName(..) | Rejection::InvalidTag(_) => Code::InvalidArgument,
        Rejection::UserHasNodes(..)
        | Rejection::PreAuthKeyExpired { .. }
        | Rejection::PreAuthKeyUsed(_)
        | Rejection::NodeKeyInUse(_)
        | Rejection::MachineKeyMismatch(_)
        | Rejection::RegistrationCompleted(_)
        | Rejection::AddressesExhausted(_)
        | Rejection::SettingsMismatch { .. } => Code::FailedPrecondition,
        Rejection::SettingsMissing => Code::Unavailable,
        Rejection::TooManyPending(_) => Code::ResourceExhausted,
    }
}

pub fn from_rejection(rejection: &Rejection) -> Status {
    Status::new(rejection_code(rejection), rejection.to_string())
}

pub fn from_propose(error: &ProposeError) -> Status {
    match error {
        ProposeError::NoLeader
        | ProposeError::Unavailable(_)
        | ProposeError::NotAppliedHere { .. } => Status::unavailable(error.to_string()),
        ProposeError::Invalid(_) => Status::invalid_argument(error.to_string()),
    }
}

/// A reply of the wrong shape: a bug, not the caller's fault.
pub fn unexpected(what: &str) -> Status {
    Status::internal(format!("unexpected reply to {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::NodeId;

    #[test]
    fn rejections_map_to_fitting_codes_with_their_message() {
        let s = from_rejection(&Rejection::UserNotFound("bob".into()));
        assert_eq!(s.code(), Code::NotFound);
        assert_eq!(s.message(), "user \"bob\" not found");
        assert_eq!(
            from_rejection(&Rejection::UserExists("a".into())).code(),
            Code::AlreadyExists
        );
        assert_eq!(
            from_rejection(&Rejection::UserHasNodes("a".into(), 2)).code(),
            Code::FailedPrecondition
        );
        assert_eq!(
            from_rejection(&Rejection::InvalidTag("x".into())).code(),
            Code::InvalidArgument
        );
        assert_eq!(
            from_rejection(&Rejection::NodeNotFound(NodeId(9))).code(),
            Code::NotFound
        );
    }

    #[test]
    fn propose_errors_map_to_unavailable_or_invalid_argument() {
        assert_eq!(
            from_propose(&ProposeError::NoLeader).code(),
            Code::Unavailable
        );
        assert_eq!(
            from_propose(&ProposeError::Unavailable("x".into())).code(),
            Code::Unavailable
        );
        let s = from_propose(&ProposeError::Invalid("member 4 unknown".into()));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(s.message(), "member 4 unknown");
    }
}
