//! Avro records of the User aggregate's events.

use apache_avro::types::Value;
use serde::{Deserialize, Serialize};

use super::{WireError, WireEvent, from_avro, parse_uuid, to_avro};
use crate::user::{NotificationPreferences, Role, UserEvent};

#[derive(Serialize, Deserialize)]
struct UserRegistered {
    user_id: String,
    email: String,
    name: String,
    password_hash: String,
}

#[derive(Serialize, Deserialize)]
struct ProfileChanged {
    user_id: String,
    name: String,
}

#[derive(Serialize, Deserialize)]
struct NotificationPreferencesChanged {
    user_id: String,
    email: bool,
    sms: bool,
    push: bool,
}

/// The shape of a granted and of a revoked role.
#[derive(Serialize, Deserialize)]
struct RoleChanged {
    user_id: String,
    role: String,
}

impl WireEvent for UserEvent {
    fn event_type(&self) -> &'static str {
        match self {
            UserEvent::UserRegistered { .. } => "UserRegistered",
            UserEvent::ProfileChanged { .. } => "ProfileChanged",
            UserEvent::NotificationPreferencesChanged { .. } => "NotificationPreferencesChanged",
            UserEvent::RoleGranted { .. } => "RoleGranted",
            UserEvent::RoleRevoked { .. } => "RoleRevoked",
        }
    }

    fn to_avro(&self) -> Result<Value, WireError> {
        match self {
            UserEvent::UserRegistered {
                user_id,
                email,
                name,
                password_hash,
            } => to_avro(&UserRegistered {
                user_id: user_id.to_string(),
                email: email.clone(),
                name: name.clone(),
                password_hash: password_hash.clone(),
            }),
            UserEvent::ProfileChanged { user_id, name } => to_avro(&ProfileChanged {
                user_id: user_id.to_string(),
                name: name.clone(),
            }),
            UserEvent::NotificationPreferencesChanged {
                user_id,
                preferences,
            } => to_avro(&NotificationPreferencesChanged {
                user_id: user_id.to_string(),
                email: preferences.email,
                sms: preferences.sms,
                push: preferences.push,
            }),
            UserEvent::RoleGranted { user_id, role } | UserEvent::RoleRevoked { user_id, role } => {
                to_avro(&RoleChanged {
                    user_id: user_id.to_string(),
                    role: role.as_str().to_owned(),
                })
            }
        }
    }

    fn from_avro(event_type: &str, value: &Value) -> Result<Self, WireError> {
        match event_type {
            "UserRegistered" => {
                let record: UserRegistered = from_avro(value)?;
                Ok(UserEvent::UserRegistered {
                    user_id: parse_uuid("user_id", &record.user_id)?,
                    email: record.email,
                    name: record.name,
                    password_hash: record.password_hash,
                })
            }
            "ProfileChanged" => {
                let record: ProfileChanged = from_avro(value)?;
                Ok(UserEvent::ProfileChanged {
                    user_id: parse_uuid("user_id", &record.user_id)?,
                    name: record.name,
                })
            }
            "NotificationPreferencesChanged" => {
                let record: NotificationPreferencesChanged = from_avro(value)?;
                Ok(UserEvent::NotificationPreferencesChanged {
                    user_id: parse_uuid("user_id", &record.user_id)?,
                    preferences: NotificationPreferences {
                        email: record.email,
                        sms: record.sms,
                        push: record.push,
                    },
                })
            }
            "RoleGranted" | "RoleRevoked" => {
                let record: RoleChanged = from_avro(value)?;
                let user_id = parse_uuid("user_id", &record.user_id)?;
                let role = Role::parse(&record.role).ok_or_else(|| WireError::Invalid {
                    field: "role",
                    message: format!("unknown role {:?}", record.role),
                })?;
                Ok(if event_type == "RoleGranted" {
                    UserEvent::RoleGranted { user_id, role }
                } else {
                    UserEvent::RoleRevoked { user_id, role }
                })
            }
            other => Err(WireError::UnknownType(other.to_owned())),
        }
    }
}
