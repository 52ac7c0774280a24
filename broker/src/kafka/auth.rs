//! Who a Kafka connection is: its listener's security protocol, the
//! principal from a client certificate, and the SASL exchange
//! (SaslHandshake v1 then SaslAuthenticate, PLAIN or SCRAM) that must
//! finish before any other request on a SASL listener. Sans-io: requests
//! in, responses out; the connection loop closes the socket when told.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kafka_protocol::ResponseError;
use kafka_protocol::messages::{
    ApiKey, SaslAuthenticateRequest, SaslAuthenticateResponse, SaslHandshakeRequest,
    SaslHandshakeResponse,
};
use kafka_protocol::protocol::StrBytes;
use shoal_security::sasl::{SaslExchange, SaslMechanism, SaslServer, SaslStep};
use shoal_security::tls::TlsServer;

/// The principal of a client nobody authenticated.
pub const ANONYMOUS: &str = "User:ANONYMOUS";

/// Kafka's security protocols, one per listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SecurityProtocol {
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

impl SecurityProtocol {
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_uppercase().as_str() {
            "PLAINTEXT" => Some(Self::Plaintext),
            "SSL" => Some(Self::Ssl),
            "SASL_PLAINTEXT" => Some(Self::SaslPlaintext),
            "SASL_SSL" => Some(Self::SaslSsl),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Plaintext => "PLAINTEXT",
            Self::Ssl => "SSL",
            Self::SaslPlaintext => "SASL_PLAINTEXT",
            Self::SaslSsl => "SASL_SSL",
        }
    }

    pub fn tls(self) -> bool {
        matches!(self, Self::Ssl | Self::SaslSsl)
    }

    pub fn sasl(self) -> bool {
        matches!(self, Self::SaslPlaintext | Self::SaslSsl)
    }
}

/// One Kafka listener's security settings.
#[derive(Debug, Clone)]
pub struct KafkaListener {
    pub protocol: SecurityProtocol,
    /// Required for SSL and SASL_SSL.
    pub tls: Option<Arc<TlsServer>>,
    /// Offered on SASL listeners, in order of preference.
    pub mechanisms: Vec<SaslMechanism>,
    /// KIP-368 `connections.max.reauth.ms`: a SASL session lasts this long,
    /// then the client must authenticate again on the same connection.
    pub reauth: Option<Duration>,
    /// Connections open at once, in total and per client address.
    pub limits: Arc<shoal_security::limits::ConnectionLimits>,
}

impl KafkaListener {
    pub fn plaintext() -> Self {
        KafkaListener {
            protocol: SecurityProtocol::Plaintext,
            tls: None,
            mechanisms: Vec::new(),
            reauth: None,
            limits: Default::default(),
        }
    }

    /// The listener name Metadata answers for (the protocol's name: one
    /// listener per protocol).
    pub fn name(&self) -> &'static str {
        self.protocol.name()
    }
}

/// What the connection loop does after a SASL response.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum After {
    Continue,
    /// Send the response, then close (a failed authentication).
    Close,
}

/// A connection's authentication state.
pub(crate) struct ConnAuth {
    listener: Arc<KafkaListener>,
    /// Set once authenticated (at once on a listener without SASL).
    principal: Option<String>,
    expires: Option<Instant>,
    /// Chosen by the last SaslHandshake; an exchange may start.
    mechanism: Option<SaslMechanism>,
    /// The mechanism of the first authentication: re-authentication
    /// (KIP-368) must use it again.
    authenticated_with: Option<SaslMechanism>,
    exchange: Option<SaslExchange>,
}

impl ConnAuth {
    pub(crate) fn new(listener: Arc<KafkaListener>, certificate: Option<String>) -> Self {
        let principal = (!listener.protocol.sasl())
            .then(|| certificate.unwrap_or_else(|| ANONYMOUS.to_string()));
        ConnAuth {
            listener,
            principal,
            expires: None,
            mechanism: None,
            authenticated_with: None,
            exchange: None,
        }
    }

    /// Has the client authenticated (at once on a listener without SASL)?
    pub(crate) fn authenticated(&self) -> bool {
        self.principal.is_some()
    }

    pub(crate) fn listener(&self) -> &Arc<KafkaListener> {
        &self.listener
    }

    pub(crate) fn principal(&self) -> &str {
        self.principal.as_deref().unwrap_or(ANONYMOUS)
    }

    /// May a request of `api` be served now? Only the handshake APIs before
    /// authentication, and nothing else once a session expired (KIP-368:
    /// the server closes such a connection).
    pub(crate) fn admits(&self, api: ApiKey, now: Instant) -> Result<(), &'static str> {
        if matches!(
            api,
            ApiKey::ApiVersions | ApiKey::SaslHandshake | ApiKey::SaslAuthenticate
        ) {
            return Ok(());
        }
        match (&self.principal, self.expires) {
            (None, _) => Err("a request before SASL authentication"),
            (Some(_), Some(e)) if now >= e => Err("the SASL session expired"),
            (Some(_), _) => Ok(()),
        }
    }

    pub(crate) fn handshake(&mut self, req: &SaslHandshakeRequest) -> SaslHandshakeResponse {
        let offered: Vec<StrBytes> = self
            .listener
            .mechanisms
            .iter()
            .map(|m| StrBytes::from_static_str(m.name()))
            .collect();
        let resp = SaslHandshakeResponse::default().with_mechanisms(offered);
        if !self.listener.protocol.sasl() {
            return resp.with_error_code(ResponseError::IllegalSaslState.code());
        }
        match SaslMechanism::parse(req.mechanism.as_str())
            .filter(|m| self.listener.mechanisms.contains(m))
        {
            Some(m) if self.authenticated_with.is_some_and(|first| first != m) => {
                resp.with_error_code(ResponseError::IllegalSaslState.code())
            }
            Some(m) => {
                self.mechanism = Some(m);
                self.exchange = None;
                resp
            }
            None => resp.with_error_code(ResponseError::UnsupportedSaslMechanism.code()),
        }
    }

    pub(crate) fn authenticate(
        &mut self,
        sasl: &SaslServer,
        req: &SaslAuthenticateRequest,
        now: Instant,
    ) -> (SaslAuthenticateResponse, After) {
        let fail = |code: ResponseError, msg: &'static str| {
            (
                SaslAuthenticateResponse::default()
                    .with_error_code(code.code())
                    .with_error_message(Some(StrBytes::from_static_str(msg))),
                After::Close,
            )
        };
        let Some(mechanism) = self.mechanism else {
            return fail(
                ResponseError::IllegalSaslState,
                "SaslAuthenticate without a SaslHandshake",
            );
        };
        let exchange = self.exchange.get_or_insert_with(|| sasl.start(mechanism));
        match exchange.step(&req.auth_bytes) {
            SaslStep::Continue { challenge } => (
                SaslAuthenticateResponse::default().with_auth_bytes(Bytes::from(challenge)),
                After::Continue,
            ),
            SaslStep::Failed { reason } => {
                self.exchange = None;
                self.mechanism = None;
                fail(ResponseError::SaslAuthenticationFailed, reason)
            }
            SaslStep::Done { user, response } => {
                self.exchange = None;
                self.mechanism = None;
                let principal = format!("User:{user}");
                // KIP-368: re-authentication may not change who it is.
                if self.principal.as_ref().is_some_and(|p| *p != principal) {
                    return fail(
                        ResponseError::SaslAuthenticationFailed,
                        "re-authentication must keep the same user",
                    );
                }
                self.principal = Some(principal);
                self.authenticated_with = Some(mechanism);
                self.expires = self.listener.reauth.map(|d| now + d);
                let lifetime = self
                    .listener
                    .reauth
                    .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
                (
                    SaslAuthenticateResponse::default()
                        .with_auth_bytes(Bytes::from(response))
                        .with_session_lifetime_ms(lifetime),
                    After::Continue,
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sasl_listener() -> Arc<KafkaListener> {
        Arc::new(KafkaListener {
            protocol: SecurityProtocol::SaslPlaintext,
            tls: None,
            mechanisms: vec![SaslMechanism::Plain],
            reauth: Some(Duration::from_secs(60)),
            limits: Default::default(),
        })
    }

    #[test]
    fn nothing_but_the_handshake_before_authentication() {
        let auth = ConnAuth::new(sasl_listener(), None);
        let now = Instant::now();
        assert!(auth.admits(ApiKey::ApiVersions, now).is_ok());
        assert!(auth.admits(ApiKey::SaslHandshake, now).is_ok());
        assert!(auth.admits(ApiKey::Metadata, now).is_err());
        assert!(auth.admits(ApiKey::Produce, now).is_err());
        let open = ConnAuth::new(Arc::new(KafkaListener::plaintext()), None);
        assert!(open.admits(ApiKey::Produce, now).is_ok());
        assert_eq!(open.principal(), ANONYMOUS);
    }

    #[test]
    fn unknown_mechanisms_and_early_authenticate_are_refused() {
        let mut auth = ConnAuth::new(sasl_listener(), None);
        let r = auth.handshake(
            &SaslHandshakeRequest::default().with_mechanism(StrBytes::from_static_str("GSSAPI")),
        );
        assert_eq!(r.error_code, ResponseError::UnsupportedSaslMechanism.code());
        assert_eq!(r.mechanisms.len(), 1);
        let users: std::sync::Arc<crate::security::Users> = Default::default();
        let sasl = SaslServer::new(users);
        let (r, after) =
            auth.authenticate(&sasl, &SaslAuthenticateRequest::default(), Instant::now());
        assert_eq!(r.error_code, ResponseError::IllegalSaslState.code());
        assert_eq!(after, After::Close);
        let mut plain = ConnAuth::new(Arc::new(KafkaListener::plaintext()), None);
        let r = plain.handshake(
            &SaslHandshakeRequest::default().with_mechanism(StrBytes::from_static_str("PLAIN")),
        );
        assert_eq!(r.error_code, ResponseError::IllegalSaslState.code());
    }
}
