//! Bearer-token authentication of Shoal's HTTP APIs: the server side
//! ([`HttpAuth`], a middleware) and the client side ([`ClientAuth`], the
//! header every intra-cluster request carries).

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use crate::{Secret, TokenFile};

/// Paths open without a token: probes and scrapers carry none.
const OPEN_PATHS: [&str; 2] = ["/health", "/metrics"];

/// What an HTTP server accepts. Off (everything open) unless a cluster
/// secret or a token file is configured.
#[derive(Clone, Default, Debug)]
pub struct HttpAuth {
    inner: Option<Arc<Verifiers>>,
}

struct Verifiers {
    secret: Option<[u8; 32]>,
    tokens: Option<TokenFile>,
}

impl std::fmt::Debug for Verifiers {
    // Not even the secret's digest is shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifiers")
            .field("secret", &self.secret.is_some())
            .field("tokens", &self.tokens.is_some())
            .finish()
    }
}

/// Who an accepted request came from, as the middleware found it (in the
/// request's extensions; absent when authentication is off).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caller {
    /// A node of the cluster: it presented the cluster secret.
    Node,
    /// An operator: it presented a token.
    Operator,
}

impl HttpAuth {
    pub fn new(secret: Option<&Secret>, tokens: Option<TokenFile>) -> Self {
        if secret.is_none() && tokens.is_none() {
            return HttpAuth { inner: None };
        }
        HttpAuth {
            inner: Some(Arc::new(Verifiers {
                secret: secret.map(Secret::digest),
                tokens,
            })),
        }
    }

    pub fn is_on(&self) -> bool {
        self.inner.is_some()
    }

    /// Does this `Authorization` header carry the cluster secret or a valid
    /// token? Always true when authentication is off.
    pub fn accepts(&self, headers: &HeaderMap) -> bool {
        self.inner.is_none() || self.caller(headers).is_some()
    }

    /// Whose credential this `Authorization` header carries, if any.
    fn caller(&self, headers: &HeaderMap) -> Option<Caller> {
        let v = self.inner.as_ref()?;
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| {
                h.strip_prefix("Bearer ")
                    .or_else(|| h.strip_prefix("bearer "))
            })
            .map(str::trim)?;
        let is_secret = v
            .secret
            .is_some_and(|s| bool::from(s.ct_eq(&crate::sha256(token.as_bytes()))));
        if is_secret {
            Some(Caller::Node)
        } else if v.tokens.as_ref().is_some_and(|t| t.accepts(token)) {
            Some(Caller::Operator)
        } else {
            None
        }
    }

    /// `router` with every path but `/health` and `/metrics` behind this
    /// check: 401 with `WWW-Authenticate: Bearer` without a valid token.
    pub fn protect(self, router: Router) -> Router {
        if !self.is_on() {
            return router;
        }
        router.layer(axum::middleware::from_fn_with_state(self, check))
    }
}

async fn check(State(auth): State<HttpAuth>, mut req: Request, next: Next) -> Response {
    if let Some(caller) = auth.caller(req.headers()) {
        req.extensions_mut().insert(caller);
        return next.run(req).await;
    }
    if OPEN_PATHS.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        axum::Json(error_body()),
    )
        .into_response()
}

/// A middleware for routes only the cluster's nodes may call (Raft's RPCs):
/// a request an operator's token let in gets 403. Where authentication is
/// off, no caller is recorded and everything passes.
pub async fn nodes_only(req: Request, next: Next) -> Response {
    if req.extensions().get::<Caller>() == Some(&Caller::Operator) {
        return operator_refused();
    }
    next.run(req).await
}

/// 403 for an operator's token where the cluster secret is needed.
pub fn operator_refused() -> Response {
    (
        StatusCode::FORBIDDEN,
        axum::Json(serde_json::json!({
            "error": "only the cluster's nodes (the cluster secret) may call this",
            "leader": null,
        })),
    )
        .into_response()
}

/// The same `{"error": ..}` shape as the APIs' other errors.
fn error_body() -> serde_json::Value {
    serde_json::json!({
        "error": "authentication required: a bearer token or the cluster secret",
        "leader": null,
    })
}

/// What an HTTP client presents: the cluster secret (nodes, the compactor)
/// or an operator's token (CLIs, from `SHOAL_TOKEN`), or nothing; and how
/// it reaches the other nodes: plain HTTP, or HTTPS verified against a CA.
#[derive(Clone, Default, Debug)]
pub struct ClientAuth {
    bearer: Option<Arc<Secret>>,
    tls: Option<ClientTls>,
}

#[derive(Clone, Debug)]
struct ClientTls {
    /// Trusted besides the system's roots (the cluster's own CA).
    ca: Option<reqwest::Certificate>,
}

impl ClientAuth {
    pub fn none() -> Self {
        ClientAuth::default()
    }

    pub fn bearer(secret: Secret) -> Self {
        ClientAuth {
            bearer: Some(Arc::new(secret)),
            tls: None,
        }
    }

    /// Call the other nodes over HTTPS, trusting the PEM CA bundle `ca`
    /// (and the system's roots).
    pub fn with_https(mut self, ca: Option<&std::path::Path>) -> crate::Result<Self> {
        let ca = match ca {
            None => None,
            Some(path) => {
                let pem = std::fs::read(path).map_err(|source| crate::Error::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                Some(
                    reqwest::Certificate::from_pem(&pem).map_err(|_| crate::Error::Invalid {
                        what: path.display().to_string(),
                        why: "not a PEM CA certificate",
                    })?,
                )
            }
        };
        self.tls = Some(ClientTls { ca });
        Ok(self)
    }

    /// `https` or `http`, for the URLs of the other nodes.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    /// `scheme://addr`: a node's base URL.
    pub fn url(&self, addr: &str) -> String {
        format!("{}://{addr}", self.scheme())
    }

    /// An operator's token from `SHOAL_TOKEN`, if set.
    pub fn from_token_env() -> crate::Result<Self> {
        Ok(match Secret::from_file_or_env(None, "SHOAL_TOKEN")? {
            Some(s) => Self::bearer(s),
            None => Self::none(),
        })
    }

    pub fn is_some(&self) -> bool {
        self.bearer.is_some()
    }

    /// A client builder that sends the credential with every request (as a
    /// header marked sensitive, so reqwest never prints it).
    pub fn http_client(&self) -> reqwest::ClientBuilder {
        let mut builder = reqwest::Client::builder();
        if let Some(ca) = self.tls.as_ref().and_then(|t| t.ca.clone()) {
            builder = builder.add_root_certificate(ca);
        }
        let Some(secret) = &self.bearer else {
            return builder;
        };
        let Ok(mut value) = HeaderValue::from_str(&format!("Bearer {}", secret.expose())) else {
            // Secret::new admits only visible characters, which are valid.
            return builder;
        };
        value.set_sensitive(true);
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, value);
        builder.default_headers(headers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::routing::get;
    use tower::ServiceExt;

    fn app(auth: HttpAuth) -> Router {
        auth.protect(
            Router::new()
                .route("/health", get(|| async { "ok" }))
                .route("/placement/v1/status", get(|| async { "status" })),
        )
    }

    async fn status(app: Router, path: &str, bearer: Option<&str>) -> StatusCode {
        let mut req = Request::builder().uri(path);
        if let Some(b) = bearer {
            req = req.header("authorization", format!("Bearer {b}"));
        }
        app.oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap()
            .status()
    }

    #[tokio::test]
    async fn everything_but_probes_needs_the_secret() {
        let secret = Secret::new("the-cluster-secret-value", "test").unwrap();
        let app = app(HttpAuth::new(Some(&secret), None));
        assert_eq!(status(app.clone(), "/health", None).await, StatusCode::OK);
        assert_eq!(
            status(app.clone(), "/placement/v1/status", None).await,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            status(
                app.clone(),
                "/placement/v1/status",
                Some("wrong-secret-value-x")
            )
            .await,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            status(app.clone(), "/nowhere", None).await,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            status(app, "/placement/v1/status", Some(secret.expose())).await,
            StatusCode::OK
        );
    }

    #[tokio::test]
    async fn off_without_secret_or_tokens() {
        let app = app(HttpAuth::new(None, None));
        assert_eq!(
            status(app, "/placement/v1/status", None).await,
            StatusCode::OK
        );
    }
}
