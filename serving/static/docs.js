// Starts Swagger UI at /docs. A file of its own rather than the inline script FastAPI's page has, so the page's
// Content-Security-Policy can allow this server's script files and nothing else.
"use strict";

window.addEventListener("DOMContentLoaded", () => {
  window.ui = SwaggerUIBundle({
    // Relative to the page, so a proxy that serves the API under a path prefix still finds the document.
    url: new URL("openapi.json", document.baseURI).href,
    dom_id: "#swagger-ui",
    layout: "BaseLayout",
    deepLinking: true,
    showExtensions: true,
    showCommonExtensions: true,
    // No badge from validator.swagger.io: the docs fetch nothing from elsewhere.
    validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
  });
});
