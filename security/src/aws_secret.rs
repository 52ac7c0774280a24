//! A secret kept in AWS Secrets Manager, read with one `GetSecretValue`
//! call signed (SigV4) with the caller's own credentials from the
//! environment, as a Lambda function has them. The signer is the one
//! object_store signs S3 requests with, so no AWS SDK comes in for one
//! call.
//!
//! Endpoint: `AWS_ENDPOINT_URL_SECRETS_MANAGER`, else `AWS_ENDPOINT_URL`,
//! else `https://secretsmanager.<region>.amazonaws.com`, the region being
//! the ARN's (or `AWS_REGION` for a bare secret name).

use bytes::Bytes;
use object_store::aws::{AwsAuthorizer, AwsCredential};
use object_store::client::{HttpRequest, HttpRequestBody};

use crate::error::{Error, Result};
use crate::secret::Secret;

/// `arn:aws:secretsmanager:REGION:ACCOUNT:secret:NAME` → REGION.
fn arn_region(id: &str) -> Option<&str> {
    let mut parts = id.split(':');
    (parts.next()? == "arn").then_some(())?;
    let _partition = parts.next()?;
    (parts.next()? == "secretsmanager").then_some(())?;
    parts.next().filter(|r| !r.is_empty())
}

fn env(name: &'static str) -> Result<String> {
    std::env::var(name).map_err(|_| Error::MissingEnv(name))
}

/// Read secret `id` (an ARN or a name) from Secrets Manager; its
/// `SecretString`, trimmed, must pass [`Secret::new`]'s checks.
pub async fn fetch(id: &str) -> Result<Secret> {
    let credential = AwsCredential {
        key_id: env("AWS_ACCESS_KEY_ID")?,
        secret_key: env("AWS_SECRET_ACCESS_KEY")?,
        token: std::env::var("AWS_SESSION_TOKEN").ok(),
    };
    let region = arn_region(id)
        .map(str::to_string)
        .or_else(|| std::env::var("AWS_REGION").ok())
        .ok_or_else(|| Error::NoRegion { id: id.into() })?;
    let endpoint = std::env::var("AWS_ENDPOINT_URL_SECRETS_MANAGER")
        .or_else(|_| std::env::var("AWS_ENDPOINT_URL"))
        .unwrap_or_else(|_| format!("https://secretsmanager.{region}.amazonaws.com"));
    // The signer parses the URI as a URL: only absolute http(s) ones pass.
    if !(endpoint.starts_with("https://") || endpoint.starts_with("http://")) {
        return Err(Error::BadEndpoint { endpoint });
    }
    let body = Bytes::from(serde_json::json!({ "SecretId": id }).to_string());
    let mut request: HttpRequest = ::http::Request::builder()
        .method("POST")
        .uri(format!("{}/", endpoint.trim_end_matches('/')))
        .header("content-type", "application/x-amz-json-1.1")
        .header("x-amz-target", "secretsmanager.GetSecretValue")
        .body(HttpRequestBody::from(body.clone()))
        .map_err(|_| Error::BadEndpoint {
            endpoint: endpoint.clone(),
        })?;
    AwsAuthorizer::new(&credential, "secretsmanager", &region).authorize(&mut request, None);

    let failed = |source| Error::SecretRequest {
        id: id.into(),
        source,
    };
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .map_err(failed)?;
    let mut send = client.post(request.uri().to_string()).body(body);
    for (name, value) in request.headers() {
        send = send.header(name.as_str(), value.as_bytes());
    }
    let response = send.send().await.map_err(failed)?;
    let status = response.status();
    let text = response.text().await.map_err(failed)?;
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    if !status.is_success() {
        let kind = doc
            .get("__type")
            .and_then(|t| t.as_str())
            .unwrap_or("(no error type)")
            .rsplit('#')
            .next()
            .unwrap_or_default()
            .to_string();
        return Err(Error::SecretRefused {
            id: id.into(),
            status: status.as_u16(),
            kind,
        });
    }
    let value = doc
        .get("SecretString")
        .and_then(|s| s.as_str())
        .ok_or_else(|| Error::NotAString { id: id.into() })?;
    Secret::new(value.trim(), id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_comes_from_the_arn() {
        assert_eq!(
            arn_region("arn:aws:secretsmanager:eu-west-1:123456789012:secret:shoal-AbCdEf"),
            Some("eu-west-1")
        );
        assert_eq!(arn_region("shoal/cluster-secret"), None);
        assert_eq!(arn_region("arn:aws:s3:::bucket"), None);
    }
}
