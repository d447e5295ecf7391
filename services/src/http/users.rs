//! The user service's endpoints: register, log in (an access token), read a profile,
//! change the profile and the notification preferences.

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post, put};
use domain::user::{NotificationPreferences, User, UserCommand};
use eventstore::AggregateStore;
use projections::user::{UserProfiles, UserView};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{OpenApi, ToSchema};
use uuid::Uuid;

use super::caller::Caller;
use super::command::{self, Command, CommandContext, Reply};
use super::context::ServiceState;
use super::openapi::{CommandProblems, QueryProblems};
use super::problem::{ApiError, PROBLEM, Problem};
use super::read::{Freshness, found, parse_id};
use crate::auth;
use crate::http::problem::ProblemKind;

/// Accepted password lengths, in characters.
const PASSWORD_LENGTH: std::ops::RangeInclusive<usize> = 8..=256;

pub fn router() -> Router<ServiceState> {
    Router::new()
        .route("/users", post(register))
        .route("/auth/token", post(token))
        .route("/users/{user_id}", get(get_user))
        .route("/users/{user_id}/profile", put(change_profile))
        .route("/users/{user_id}/preferences", put(change_preferences))
}

/// The user service's endpoints, for `/openapi.json`.
#[derive(OpenApi)]
#[openapi(
    paths(register, token, get_user, change_profile, change_preferences),
    tags((name = "users", description = "Registration, log-in, profiles and preferences"))
)]
pub struct Api;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct Register {
    #[schema(example = "ada@example.com")]
    email: String,
    #[schema(example = "Ada Lovelace")]
    name: String,
    /// 8 to 256 characters; stored only as an Argon2id hash.
    #[schema(example = "correct horse battery staple")]
    password: String,
}

/// The answer to `POST /users`.
#[derive(Debug, Serialize, ToSchema)]
struct Registered {
    user_id: Uuid,
    /// The user stream's version: `?min_version=` on `GET /users/{id}`.
    version: i64,
    position: Option<i64>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct Credentials {
    #[schema(example = "ada@example.com")]
    email: String,
    password: String,
}

/// The answer to `POST /auth/token`.
#[derive(Debug, Serialize, ToSchema)]
struct AccessToken {
    /// A JWT (HS256) naming the user in `sub` and their roles (`operator`) in `roles`.
    access_token: String,
    #[schema(example = "Bearer")]
    token_type: &'static str,
    /// Seconds until it expires.
    expires_in: u64,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ChangeProfile {
    #[schema(example = "Ada King")]
    name: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ChangePreferences {
    email: bool,
    sms: bool,
    push: bool,
}

/// The answer to a profile or preferences change.
#[derive(Debug, Serialize, ToSchema)]
struct UserChanged {
    user_id: Uuid,
    version: i64,
    position: Option<i64>,
}

/// Register a user (201); an e-mail address already registered is a 409.
#[utoipa::path(post, path = "/users", tag = "users", request_body = Register,
    params(CommandContext),
    responses(
        (status = 201, description = "Registered", body = Registered),
        (status = 409, description = "The e-mail address is taken", body = Problem,
            content_type = PROBLEM),
        CommandProblems,
    ))]
async fn register(
    State(state): State<ServiceState>,
    request: Command<Register>,
) -> Result<Response, ApiError> {
    let db = &state.db;
    let body = request.body;
    if !PASSWORD_LENGTH.contains(&body.password.chars().count()) {
        return Err(ApiError::invalid(
            "password",
            "must be 8 to 256 characters long",
        ));
    }
    let email = body.email.trim().to_ascii_lowercase();
    domain::user::validate_email(&email)?;
    let password_hash = auth::hash_password(body.password)
        .await
        .map_err(ApiError::internal)?;
    let user_id = Uuid::now_v7();
    let command = UserCommand::RegisterUser {
        user_id,
        email: email.clone(),
        name: body.name,
        password_hash,
    };
    let stream_id = AggregateStore::stream_id::<User>(user_id);
    let mut context = request.context;
    context.if_match = Some(0);
    // The address is claimed in the registration's own transaction: of two racing
    // registrations of one address, the second waits for the first and is refused.
    let claim = command::first(move |transaction| {
        Box::pin(async move {
            let claimed = sqlx::query(
                "INSERT INTO user_emails (email, user_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            )
            .bind(&email)
            .bind(user_id)
            .execute(transaction.connection())
            .await?;
            if claimed.rows_affected() == 0 {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    ProblemKind::EmailTaken,
                    "a user with this e-mail address is already registered",
                )
                .with_field("email"));
            }
            Ok(())
        })
    });
    command::run_with::<User>(
        &db.aggregates,
        &context,
        &stream_id,
        &command,
        claim,
        |executed| Reply {
            status: StatusCode::CREATED,
            body: json!(Registered {
                user_id,
                version: executed.version,
                position: executed.append.map(|a| a.last_position),
            }),
        },
    )
    .await
}

/// Log in: an access token for the user with these credentials, or 401.
#[utoipa::path(post, path = "/auth/token", tag = "users", request_body = Credentials,
    responses(
        (status = 200, description = "Logged in", body = AccessToken),
        (status = 401, description = "Unknown e-mail or wrong password", body = Problem,
            content_type = PROBLEM),
        CommandProblems,
    ))]
async fn token(
    State(state): State<ServiceState>,
    request: Command<Credentials>,
) -> Result<Response, ApiError> {
    let db = &state.db;
    let credentials = request.body;
    let email = credentials.email.trim().to_ascii_lowercase();
    // From the index the registration wrote, then the aggregate: both current the
    // moment the registration committed, where the read model may lag.
    let user_id: Option<Uuid> =
        sqlx::query_scalar("SELECT user_id FROM user_emails WHERE email = $1")
            .bind(&email)
            .fetch_optional(&db.pool)
            .await?;
    let user = match user_id {
        Some(user_id) => {
            let stream_id = AggregateStore::stream_id::<User>(user_id);
            Some(db.aggregates.load::<User>(&stream_id).await?.state)
        }
        None => None,
    };
    let hash = user.as_ref().map(|user| user.password_hash.clone());
    let verified = auth::verify_password(credentials.password, hash).await?;
    let (Some(user), true) = (user, verified) else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            ProblemKind::InvalidCredentials,
            "the e-mail address or the password is wrong",
        ));
    };
    let user_id = user
        .user_id
        .ok_or_else(|| ApiError::internal("a user without an id"))?;
    let roles: Vec<_> = user.roles.iter().copied().collect();
    let access_token = state
        .tokens
        .issue(user_id, &user.email, &roles)
        .map_err(ApiError::internal)?;
    Ok(Json(AccessToken {
        access_token,
        token_type: "Bearer",
        expires_in: state.tokens.lifetime.as_secs(),
    })
    .into_response())
}

/// A user's profile and notification preferences, from the user-profiles read model.
#[utoipa::path(get, path = "/users/{user_id}", tag = "users",
    params(("user_id" = Uuid, Path), Freshness),
    responses(
        (status = 200, description = "The user", body = UserView),
        (status = 404, description = "No such user, or another user", body = Problem,
            content_type = PROBLEM),
        QueryProblems,
    ))]
async fn get_user(
    State(state): State<ServiceState>,
    caller: Caller,
    Path(user_id): Path<String>,
    freshness: Freshness,
) -> Result<Response, ApiError> {
    caller.reader()?;
    let user_id = parse_user_id(&user_id)?;
    if !caller.sees(Some(user_id)) {
        return Err(no_user(user_id));
    }
    let stream_id = AggregateStore::stream_id::<User>(user_id);
    freshness
        .wait::<UserProfiles>(&state, Some(&stream_id))
        .await?;
    let view = projections::user::find_user(&state.db.pool, user_id).await?;
    found(view, || no_user(user_id).detail)
}

/// Change the user's name.
#[utoipa::path(put, path = "/users/{user_id}/profile", tag = "users", request_body = ChangeProfile,
    params(("user_id" = Uuid, Path), CommandContext),
    responses(
        (status = 200, description = "Changed (or already so)", body = UserChanged),
        (status = 404, description = "No such user", body = Problem, content_type = PROBLEM),
        (status = 409, description = "If-Match is stale", body = Problem, content_type = PROBLEM),
        CommandProblems,
    ))]
async fn change_profile(
    State(state): State<ServiceState>,
    caller: Caller,
    Path(user_id): Path<String>,
    request: Command<ChangeProfile>,
) -> Result<Response, ApiError> {
    let command = UserCommand::ChangeProfile {
        name: request.body.name,
    };
    change(&state, caller, &user_id, &request.context, &command).await
}

/// Choose the channels the user is notified on.
#[utoipa::path(put, path = "/users/{user_id}/preferences", tag = "users",
    request_body = ChangePreferences,
    params(("user_id" = Uuid, Path), CommandContext),
    responses(
        (status = 200, description = "Changed (or already so)", body = UserChanged),
        (status = 404, description = "No such user", body = Problem, content_type = PROBLEM),
        (status = 409, description = "If-Match is stale", body = Problem, content_type = PROBLEM),
        CommandProblems,
    ))]
async fn change_preferences(
    State(state): State<ServiceState>,
    caller: Caller,
    Path(user_id): Path<String>,
    request: Command<ChangePreferences>,
) -> Result<Response, ApiError> {
    let body = request.body;
    let command = UserCommand::ChangeNotificationPreferences(NotificationPreferences {
        email: body.email,
        sms: body.sms,
        push: body.push,
    });
    change(&state, caller, &user_id, &request.context, &command).await
}

/// Runs a change on an existing user (the caller's own, through the gateway).
async fn change(
    state: &ServiceState,
    caller: Caller,
    user_id: &str,
    context: &CommandContext,
    command: &UserCommand,
) -> Result<Response, ApiError> {
    caller.actor()?;
    let user_id = parse_user_id(user_id)?;
    if !caller.sees(Some(user_id)) {
        return Err(no_user(user_id));
    }
    let stream_id = AggregateStore::stream_id::<User>(user_id);
    command::run::<User>(
        &state.db.aggregates,
        context,
        &stream_id,
        command,
        |executed| Reply {
            status: StatusCode::OK,
            body: json!(UserChanged {
                user_id,
                version: executed.version,
                position: executed.append.map(|a| a.last_position),
            }),
        },
    )
    .await
}

/// What a missing user and another user's answer alike.
fn no_user(user_id: Uuid) -> ApiError {
    ApiError::not_found(format!("no user {user_id}"))
}

fn parse_user_id(text: &str) -> Result<Uuid, ApiError> {
    parse_id("user_id", text)
}
