// The service's JSON API as the page calls it: fetch + JSON, a refusal as a ServiceError.

export class ServiceError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

// fetch + JSON; a non-2xx answer throws ServiceError with the service's own reason.
export async function api(path, options) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (err) {
    throw new ServiceError(0, "the service cannot be reached (" + err.message + ")");
  }
  let body = null;
  try {
    body = await response.json();
  } catch (err) {
    body = null;
  }
  if (!response.ok) {
    const detail = body && (body.detail || body.error);
    throw new ServiceError(response.status, detail || response.statusText || "no reason given");
  }
  return body;
}
