//! The User aggregate: registration, profile and notification preferences.
//!
//! Passwords arrive already hashed: hashing is slow, salted and random, so it happens in
//! the user service before `decide`. E-mail uniqueness across users is the service's
//! job too (it needs a lookup); this aggregate only checks the shape of the address.

use uuid::Uuid;

use crate::Aggregate;

/// Which channels a user wants notifications on. E-mail only, by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotificationPreferences {
    pub email: bool,
    pub sms: bool,
    pub push: bool,
}

impl Default for NotificationPreferences {
    fn default() -> Self {
        NotificationPreferences {
            email: true,
            sms: false,
            push: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserCommand {
    RegisterUser {
        user_id: Uuid,
        email: String,
        name: String,
        password_hash: String,
    },
    ChangeProfile {
        name: String,
    },
    ChangeNotificationPreferences(NotificationPreferences),
    /// Gives the user a role (an operator's CLI does this; no HTTP endpoint does).
    GrantRole(Role),
    RevokeRole(Role),
}

/// What a user may do beyond acting for themselves. Access tokens name the roles of
/// their user as they were at log-in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Reads every user's data and operates the system (the console, support).
    Operator,
}

impl Role {
    pub const ALL: [Role; 1] = [Role::Operator];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Operator => "operator",
        }
    }

    pub fn parse(text: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|role| role.as_str() == text)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserEvent {
    UserRegistered {
        user_id: Uuid,
        email: String,
        name: String,
        password_hash: String,
    },
    ProfileChanged {
        user_id: Uuid,
        name: String,
    },
    NotificationPreferencesChanged {
        user_id: Uuid,
        preferences: NotificationPreferences,
    },
    RoleGranted {
        user_id: Uuid,
        role: Role,
    },
    RoleRevoked {
        user_id: Uuid,
        role: Role,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UserError {
    #[error("user already exists")]
    AlreadyExists,
    #[error("user not found")]
    NotFound,
    #[error("invalid {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct User {
    pub user_id: Option<Uuid>,
    pub email: String,
    pub name: String,
    pub password_hash: String,
    pub preferences: NotificationPreferences,
    pub roles: std::collections::BTreeSet<Role>,
}

impl Aggregate for User {
    const KIND: &'static str = "user";
    type Command = UserCommand;
    type Event = UserEvent;
    type Error = UserError;

    fn decide(&self, command: &UserCommand) -> Result<Vec<UserEvent>, UserError> {
        match command {
            UserCommand::RegisterUser {
                user_id,
                email,
                name,
                password_hash,
            } => {
                if self.user_id.is_some() {
                    return Err(UserError::AlreadyExists);
                }
                validate_email(email)?;
                validate_name(name)?;
                if password_hash.is_empty() {
                    return Err(invalid("password", "must not be empty"));
                }
                Ok(vec![UserEvent::UserRegistered {
                    user_id: *user_id,
                    email: email.trim().to_ascii_lowercase(),
                    name: name.trim().to_owned(),
                    password_hash: password_hash.clone(),
                }])
            }
            UserCommand::ChangeProfile { name } => {
                let user_id = self.user_id.ok_or(UserError::NotFound)?;
                validate_name(name)?;
                let name = name.trim();
                if name == self.name {
                    return Ok(vec![]);
                }
                Ok(vec![UserEvent::ProfileChanged {
                    user_id,
                    name: name.to_owned(),
                }])
            }
            UserCommand::ChangeNotificationPreferences(preferences) => {
                let user_id = self.user_id.ok_or(UserError::NotFound)?;
                if *preferences == self.preferences {
                    return Ok(vec![]);
                }
                Ok(vec![UserEvent::NotificationPreferencesChanged {
                    user_id,
                    preferences: *preferences,
                }])
            }
            UserCommand::GrantRole(role) => {
                let user_id = self.user_id.ok_or(UserError::NotFound)?;
                if self.roles.contains(role) {
                    return Ok(vec![]);
                }
                Ok(vec![UserEvent::RoleGranted {
                    user_id,
                    role: *role,
                }])
            }
            UserCommand::RevokeRole(role) => {
                let user_id = self.user_id.ok_or(UserError::NotFound)?;
                if !self.roles.contains(role) {
                    return Ok(vec![]);
                }
                Ok(vec![UserEvent::RoleRevoked {
                    user_id,
                    role: *role,
                }])
            }
        }
    }

    fn evolve(mut self, event: &UserEvent) -> Self {
        match event {
            UserEvent::UserRegistered {
                user_id,
                email,
                name,
                password_hash,
            } => {
                self.user_id = Some(*user_id);
                self.email = email.clone();
                self.name = name.clone();
                self.password_hash = password_hash.clone();
            }
            UserEvent::ProfileChanged { name, .. } => self.name = name.clone(),
            UserEvent::NotificationPreferencesChanged { preferences, .. } => {
                self.preferences = *preferences;
            }
            UserEvent::RoleGranted { role, .. } => {
                self.roles.insert(*role);
            }
            UserEvent::RoleRevoked { role, .. } => {
                self.roles.remove(role);
            }
        }
        self
    }
}

/// A deliberately loose check (one `@`, a dot in the domain, no spaces): the real proof
/// of an address is mail arriving, not a regular expression.
pub fn validate_email(email: &str) -> Result<(), UserError> {
    let email = email.trim();
    let ok = email.len() <= 254
        && !email.contains(char::is_whitespace)
        && match email.split_once('@') {
            Some((local, domain)) => {
                !local.is_empty() && domain.contains('.') && !domain.contains('@')
            }
            None => false,
        };
    if ok {
        Ok(())
    } else {
        Err(invalid("email", "is not an e-mail address"))
    }
}

fn validate_name(name: &str) -> Result<(), UserError> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 200 {
        return Err(invalid("name", "must be 1 to 200 characters"));
    }
    Ok(())
}

fn invalid(field: &'static str, message: impl Into<String>) -> UserError {
    UserError::Invalid {
        field,
        message: message.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::given;

    const ID: Uuid = Uuid::from_u128(5);

    fn register(email: &str) -> UserCommand {
        UserCommand::RegisterUser {
            user_id: ID,
            email: email.into(),
            name: " Ada ".into(),
            password_hash: "$argon2id$stub".into(),
        }
    }

    #[test]
    fn registering_normalises_email_and_name() {
        let events = given::<User>(&[])
            .decide(&register("Ada@Example.COM"))
            .unwrap();
        assert_eq!(
            events,
            vec![UserEvent::UserRegistered {
                user_id: ID,
                email: "ada@example.com".into(),
                name: "Ada".into(),
                password_hash: "$argon2id$stub".into(),
            }]
        );
        let user = given::<User>(&events);
        assert_eq!(user.preferences, NotificationPreferences::default());
        assert_eq!(
            user.decide(&register("x@y.z")),
            Err(UserError::AlreadyExists)
        );
    }

    #[test]
    fn bad_addresses_are_refused() {
        for email in ["", "no-at", "@example.com", "a@nodot", "a b@c.d", "a@b@c.d"] {
            assert!(
                matches!(
                    given::<User>(&[]).decide(&register(email)),
                    Err(UserError::Invalid { field: "email", .. })
                ),
                "{email:?}"
            );
        }
    }

    #[test]
    fn profile_and_preferences_change_only_when_different() {
        let user = given::<User>(&given::<User>(&[]).decide(&register("a@b.c")).unwrap());
        assert_eq!(
            user.decide(&UserCommand::ChangeProfile { name: "Ada".into() }),
            Ok(vec![])
        );
        let renamed = user
            .decide(&UserCommand::ChangeProfile {
                name: "Ada L.".into(),
            })
            .unwrap();
        assert_eq!(user.clone().replay(&renamed).name, "Ada L.");
        let sms = NotificationPreferences {
            email: false,
            sms: true,
            push: false,
        };
        let changed = user
            .decide(&UserCommand::ChangeNotificationPreferences(sms))
            .unwrap();
        let user = user.replay(&changed);
        assert_eq!(user.preferences, sms);
        assert_eq!(
            user.decide(&UserCommand::ChangeNotificationPreferences(sms)),
            Ok(vec![])
        );
    }

    #[test]
    fn a_role_is_granted_and_revoked_once() {
        let user = given::<User>(&given::<User>(&[]).decide(&register("a@b.c")).unwrap());
        let granted = user
            .decide(&UserCommand::GrantRole(Role::Operator))
            .unwrap();
        assert_eq!(
            granted,
            vec![UserEvent::RoleGranted {
                user_id: ID,
                role: Role::Operator
            }]
        );
        let operator = user.replay(&granted);
        assert!(operator.roles.contains(&Role::Operator));
        assert_eq!(
            operator.decide(&UserCommand::GrantRole(Role::Operator)),
            Ok(vec![])
        );
        let revoked = operator
            .decide(&UserCommand::RevokeRole(Role::Operator))
            .unwrap();
        let plain = operator.replay(&revoked);
        assert!(plain.roles.is_empty());
        assert_eq!(
            plain.decide(&UserCommand::RevokeRole(Role::Operator)),
            Ok(vec![])
        );
        assert_eq!(
            given::<User>(&[]).decide(&UserCommand::GrantRole(Role::Operator)),
            Err(UserError::NotFound)
        );
    }

    #[test]
    fn changing_a_missing_user_is_not_found() {
        assert_eq!(
            given::<User>(&[]).decide(&UserCommand::ChangeProfile { name: "x".into() }),
            Err(UserError::NotFound)
        );
    }
}
