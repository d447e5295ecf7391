//! The user service's read model: each user's profile and notification preferences
//! (never the password hash).

use chrono::{DateTime, Utc};
use domain::user::UserEvent;
use serde::Serialize;
use sqlx::{FromRow, PgConnection, PgPool};
use uuid::Uuid;

use crate::{EventContext, Projection};

/// `GET /users/{id}`.
pub struct UserProfiles;

/// Which channels a user is notified on.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PreferencesView {
    pub email: bool,
    pub sms: bool,
    pub push: bool,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UserView {
    pub user_id: Uuid,
    pub email: String,
    pub name: String,
    pub preferences: PreferencesView,
    pub registered_at: DateTime<Utc>,
    /// What the user may do beyond acting for themselves (`operator`).
    pub roles: Vec<String>,
    pub version: i64,
}

#[derive(FromRow)]
struct UserRow {
    user_id: Uuid,
    email: String,
    name: String,
    notify_email: bool,
    notify_sms: bool,
    notify_push: bool,
    registered_at: DateTime<Utc>,
    roles: Vec<String>,
    version: i64,
}

impl Projection for UserProfiles {
    const NAME: &'static str = "user-profiles";
    const SERVICE: &'static str = "user";
    const STREAM_PREFIX: &'static str = "user-";
    const TABLES: &'static [&'static str] = &["user_profiles"];
    type Event = UserEvent;

    async fn apply(
        &self,
        event: &UserEvent,
        context: &EventContext,
        connection: &mut PgConnection,
    ) -> Result<(), sqlx::Error> {
        match event {
            UserEvent::UserRegistered {
                user_id,
                email,
                name,
                ..
            } => {
                let defaults = domain::user::NotificationPreferences::default();
                sqlx::query(
                    "INSERT INTO user_profiles (user_id, email, name, notify_email, notify_sms, \
                     notify_push, version, position, registered_at, updated_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9) ON CONFLICT (user_id) DO NOTHING",
                )
                .bind(user_id)
                .bind(email)
                .bind(name)
                .bind(defaults.email)
                .bind(defaults.sms)
                .bind(defaults.push)
                .bind(context.stream_version)
                .bind(context.global_position)
                .bind(context.recorded_at)
                .execute(connection)
                .await?;
            }
            UserEvent::ProfileChanged { user_id, name } => {
                sqlx::query(
                    "UPDATE user_profiles SET name = $2, version = $3, position = $4, \
                     updated_at = $5 WHERE user_id = $1 AND version < $3",
                )
                .bind(user_id)
                .bind(name)
                .bind(context.stream_version)
                .bind(context.global_position)
                .bind(context.recorded_at)
                .execute(connection)
                .await?;
            }
            UserEvent::NotificationPreferencesChanged {
                user_id,
                preferences,
            } => {
                sqlx::query(
                    "UPDATE user_profiles SET notify_email = $2, notify_sms = $3, notify_push = $4, \
                     version = $5, position = $6, updated_at = $7 \
                     WHERE user_id = $1 AND version < $5",
                )
                .bind(user_id)
                .bind(preferences.email)
                .bind(preferences.sms)
                .bind(preferences.push)
                .bind(context.stream_version)
                .bind(context.global_position)
                .bind(context.recorded_at)
                .execute(connection)
                .await?;
            }
            UserEvent::RoleGranted { user_id, role } | UserEvent::RoleRevoked { user_id, role } => {
                let granted = matches!(event, UserEvent::RoleGranted { .. });
                sqlx::query(
                    "UPDATE user_profiles SET roles = CASE WHEN $2 \
                     THEN array(SELECT DISTINCT unnest(array_append(roles, $3)) ORDER BY 1) \
                     ELSE array_remove(roles, $3) END, \
                     version = $4, position = $5, updated_at = $6 \
                     WHERE user_id = $1 AND version < $4",
                )
                .bind(user_id)
                .bind(granted)
                .bind(role.as_str())
                .bind(context.stream_version)
                .bind(context.global_position)
                .bind(context.recorded_at)
                .execute(connection)
                .await?;
            }
        }
        Ok(())
    }
}

/// One user's profile, if the projection has it.
pub async fn find_user(pool: &PgPool, user_id: Uuid) -> Result<Option<UserView>, sqlx::Error> {
    let row: Option<UserRow> = sqlx::query_as(
        "SELECT user_id, email, name, notify_email, notify_sms, notify_push, registered_at, \
         roles, version FROM user_profiles WHERE user_id = $1",
    )
    .bind(user_id)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|row| UserView {
        user_id: row.user_id,
        email: row.email,
        name: row.name,
        preferences: PreferencesView {
            email: row.notify_email,
            sms: row.notify_sms,
            push: row.notify_push,
        },
        registered_at: row.registered_at,
        roles: row.roles,
        version: row.version,
    }))
}
